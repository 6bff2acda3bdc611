"""Which experts, and which neurons of each, a mixture-of-experts layer keeps (``prune.plan``
calls these per layer): experts ranked by ``prune.expert_metric`` from the scores'
``layer{i}.experts.*``, neurons by ``layer{i}.expert_mlp.<agg>`` - each expert's own, or the sum
over the kept experts with ``prune.moe_neurons=shared``."""

from __future__ import annotations

from minitron_mcore.errors import require
from minitron_mcore.importance.aggregate import top_k
from minitron_mcore.importance.scores import Scores
from minitron_mcore.models.arch import ModelArch


def all_experts(src: ModelArch) -> tuple:
    """Every expert with every neuron (a layer kept whole); (None, None) for a dense model."""
    if not src.is_moe:
        return None, None
    every = list(range(src.moe_ffn_hidden_size))
    return list(range(src.num_moe_experts)), [every] * src.num_moe_experts


def kept_experts(scores: Scores, i: int, dst: ModelArch, cfg) -> tuple:
    """Layer ``i``'s kept experts (``prune.expert_metric``) and each one's kept neurons
    (``prune.moe_neurons``)."""
    key = f"layer{i}.experts.{cfg.expert_metric}"
    require(
        key in scores.tensors,
        f"the scores have no {key}; re-run minitron importance on this mixture-of-experts model",
    )
    experts = top_k(scores.tensors[key], dst.num_moe_experts)
    per_expert = scores.site(i, "expert_mlp", cfg.agg or None)  # [E, f]
    width = dst.moe_ffn_hidden_size
    if cfg.moe_neurons == "shared":
        shared = top_k(per_expert[experts].sum(0), width)
        return experts, [shared] * len(experts)
    return experts, [top_k(per_expert[e], width) for e in experts]
