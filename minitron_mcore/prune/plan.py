"""Prune targets + importance scores -> a prune plan (kept indices per axis, dropped layers).

Depth first, then width (Minitron, arXiv 2407.14679 sec. 2.3): layers are chosen from the layer
scores; embedding channels are ranked by their importance summed over the kept layers; each kept
layer then keeps its most important MLP neurons, query groups, and heads within each group.
Kept indices are returned in ascending order (the model keeps its original channel order) and
ties break towards the lower index, so a plan is deterministic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from minitron_mcore.checkpoint import hf_mapping
from minitron_mcore.errors import MinitronError, require
from minitron_mcore.importance.aggregate import group_scores, top_k
from minitron_mcore.importance.scores import Scores
from minitron_mcore.models.arch import ModelArch
from minitron_mcore.prune.experts import all_experts, kept_experts
from minitron_mcore.prune.slicing import LayerPlan

DEPTH_METRICS = ("block_loss", "layer_loss", "bi")
EXPERT_METRICS = ("score", "frequency", "prob")
MOE_NEURONS = ("per_expert", "shared")
MOE_KEYS = ("num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk")


@dataclass
class PruneTarget:
    """Target sizes (null = keep the source's)."""

    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    num_layers: Optional[int] = None
    num_moe_experts: Optional[int] = None
    """Routed experts per layer (mixture of experts): the least important are dropped, with
    their router rows."""
    moe_ffn_hidden_size: Optional[int] = None
    """Width of every expert's MLP."""
    moe_router_topk: Optional[int] = None
    """Experts per token (null = the source's, when the kept experts allow it)."""


@dataclass
class PruneConfig:
    """``prune.*``."""

    target: PruneTarget = field(default_factory=PruneTarget)
    drop_layers: list = field(default_factory=list)
    """Explicit layers (0-based) to drop; overrides ``target.num_layers``."""
    depth_metric: str = "block_loss"
    """How layers are chosen for ``target.num_layers``: block_loss (drop the contiguous block
    whose removal raises the LM loss least - the papers' best), layer_loss (drop the layers whose
    single removal hurts least) or bi (lowest block importance 1 - cos)."""
    agg: str = ""
    """Aggregation to rank width by, "<seq>-<batch>" (e.g. mean-l2); empty = the scores' default."""
    expert_metric: str = "score"
    """How experts are ranked for ``target.num_moe_experts``: score (router probability x
    expert output norm over the calibration tokens), frequency (how often an expert is
    routed to) or prob (router probability mass): see ``importance/moe.py``."""
    moe_neurons: str = "per_expert"
    """``target.moe_ffn_hidden_size``: each expert keeps its own most important neurons
    (per_expert) or every expert keeps the same ones, ranked over all kept experts (shared)."""


@dataclass
class PrunePlan:
    src: ModelArch
    dst: ModelArch
    kept_layers: list[int]
    """Source layer of each new layer, in order."""
    hidden: Optional[list[int]]
    """Kept embedding channels (None = all)."""
    layers: list[LayerPlan]
    """Per new layer."""

    def to_dict(self) -> dict:
        return {
            "source_arch": self.src.to_dict(),
            "kept_layers": self.kept_layers,
            "dropped_layers": [i for i in range(self.src.num_layers) if i not in self.kept_layers],
            "layer_map": {str(j): i for j, i in enumerate(self.kept_layers)},
            "hidden": self.hidden,
            "layers": [dataclasses.asdict(p) for p in self.layers],
        }


def check_target(
    src: ModelArch, t: PruneTarget, hf_base: Optional[dict] = None, tp: int = 1
) -> ModelArch:
    """The pruned shape ``t`` gives ``src``, refused with one error line when it breaks a target
    rule or when ``export-hf`` could not write it (:func:`check_exportable`). ``prune`` and
    ``minitron pipeline``'s plan check (dry runs included) both call this, so a student that
    cannot be exported fails in seconds, not after its distillation."""
    dst = _target_shape(src, t)
    check_exportable(src, t, hf_base, tp)
    return dst


def _target_shape(src: ModelArch, t: PruneTarget) -> ModelArch:
    """The pruned shape, after the rules of the method itself: sizes within the source's, and
    every query group keeping the same number of heads."""
    for name in MOE_KEYS:
        require(
            getattr(t, name) is None or src.is_moe,
            f"prune.target.{name} applies to mixture-of-experts models; this {src.family} model "
            "is dense",
        )
    require(
        t.ffn_hidden_size is None or not src.is_moe,
        "prune.target.ffn_hidden_size: a mixture-of-experts model's MLP width is "
        "prune.target.moe_ffn_hidden_size",
    )
    for name in (
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "num_layers",
        *MOE_KEYS,
    ):
        want, have = getattr(t, name), getattr(src, name)
        if want is not None:
            require(
                0 < want <= have,
                f"prune.target.{name}={want} is not possible: the model has "
                f"{have} (a target must be between 1 and the current size)",
            )
    groups = t.num_query_groups or src.num_query_groups
    heads = t.num_attention_heads or (src.heads_per_group * groups)
    require(
        heads % groups == 0,
        f"prune.target.num_attention_heads={heads} is not divisible by "
        f"num_query_groups={groups}; every group keeps the same number "
        "of heads",
    )
    require(
        heads // groups <= src.heads_per_group,
        f"{heads} heads over {groups} query groups needs {heads // groups} heads per group, "
        f"but the source groups have {src.heads_per_group}; keep more groups",
    )
    moe = {}
    if src.is_moe:
        experts = t.num_moe_experts or src.num_moe_experts
        topk = t.moe_router_topk or src.moe_router_topk
        require(
            experts >= 2 and topk <= experts,
            f"prune.target.num_moe_experts={experts} with top-{topk} routing: keep at least 2 "
            "experts and at least as many as prune.target.moe_router_topk",
        )
        fe = t.moe_ffn_hidden_size or src.moe_ffn_hidden_size
        moe = dict(num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=fe)
        if src.ffn_hidden_size == src.moe_ffn_hidden_size:  # Mixtral: one field in its config
            moe["ffn_hidden_size"] = fe
    sizes = dict(
        hidden_size=t.hidden_size or src.hidden_size,
        ffn_hidden_size=t.ffn_hidden_size or src.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        num_layers=t.num_layers or src.num_layers,
        kv_channels=src.kv_channels,
    )
    return src.replace(**{**sizes, **moe})


def student_shape(
    src: ModelArch, cfg: PruneConfig, tp: int = 1, pp: int = 1, ep: int = 1
) -> ModelArch:
    """The shape ``prune`` gives ``src`` for ``cfg``, with every check that needs no weights
    (the target rules, exportability, layers dropped by name, the TP/PP layout): what a
    pipeline checks for each student before its first step."""
    dst = check_target(src, cfg.target)
    if cfg.drop_layers:
        dst = dst.replace(num_layers=src.num_layers - len(set(cfg.drop_layers)))
    dst.check_parallel(tp, pp, ep)
    return dst


def block_sizes_needed(src: ModelArch, cfg: PruneConfig) -> list[int]:
    """The contiguous-block removal losses (``importance.block_sizes``) this prune can read: a
    depth target not given by ``drop_layers`` removes one block of the layers it drops."""
    keep = cfg.target.num_layers
    if keep and keep < src.num_layers and not cfg.drop_layers:
        return [src.num_layers - keep]
    return []


def check_exportable(
    src: ModelArch, t: PruneTarget, hf_base: Optional[dict] = None, tp: int = 1
) -> None:
    """Refuse, before any weight is read, a target whose pruned model ``export-hf`` could not
    write, naming the nearest targets that it could.

    transformers 5 validates a config when it is built: ``LlamaConfig`` refuses a hidden size
    that is not a multiple of the head count even with an explicit ``head_dim`` (SmolLM2-135M,
    9 heads: ``prune.target.hidden_size=448``), which used to surface as a traceback at the end
    of the run. The check builds the config the export would write (``hf_base``: the source's
    config.json, as the export keeps its other fields) and lets transformers judge it.
    ``tp``: the suggested targets also split over this TP size (when the given one does: else
    the TP error that follows is the one to read, and suggestions ignore TP).
    """
    dst = _target_shape(src, t)
    reason = hf_mapping.export_refusal(dst, hf_base)
    if reason is not None:
        tp = tp if _splits(dst, tp) else 1
        raise MinitronError(_refusal_message(src, t, dst, reason, hf_base, tp))


def _splits(arch: ModelArch, tp: int) -> bool:
    """Whether ``arch``'s heads, groups and MLP split over ``tp`` ranks (PP splits layers,
    which a width suggestion keeps)."""
    try:
        arch.check_parallel(tp, 1)
    except MinitronError:
        return False
    return True


def _accepted(src: ModelArch, t: PruneTarget, hf_base: Optional[dict], tp: int) -> bool:
    """Whether ``prune`` would take target ``t``: the target rules, a split over ``tp`` ranks,
    and a config transformers accepts."""
    try:
        dst = _target_shape(src, t)
    except MinitronError:
        return False
    return _splits(dst, tp) and hf_mapping.export_refusal(dst, hf_base) is None


def _nearest_target(
    src: ModelArch, t: PruneTarget, hf_base: Optional[dict], tp: int
) -> Optional[tuple[str, list[int]]]:
    """The first target key the user set that, changed alone, gives a target ``prune`` takes,
    with its nearest such values (between 1 and the source's size)."""
    for key in hf_mapping.SIZE_KEYS:
        value = getattr(t, key)
        if value is None:
            continue

        def accepts(v: int, key: str = key) -> bool:
            return _accepted(src, dataclasses.replace(t, **{key: v}), hf_base, tp)

        near = hf_mapping.nearest_accepted(value, accepts, 1, getattr(src, key))
        if near:
            return key, near
    return None


def _refusal_message(
    src: ModelArch, t: PruneTarget, dst: ModelArch, reason: str, hf_base: Optional[dict], tp: int
) -> str:
    """One line: which target transformers refuses, its words, and what it would accept."""
    import transformers

    refused = f"gives a config transformers {transformers.__version__} refuses for {dst.family} "
    refused += f"({reason})"
    found = _nearest_target(src, t, hf_base, tp)
    if found:
        key, near = found
        values = " or ".join(map(str, near))
        return f"prune.target.{key}={getattr(t, key)} {refused}; nearest accepted: {values}"
    if hf_mapping.export_refusal(src, hf_base) is not None:
        return (
            f"the source model {refused}; export-hf could write neither it nor a model pruned "
            "from it: fix the source's config or upgrade transformers"
        )
    return (
        f"the pruned model {refused}, and no single prune.target value within "
        f"{hf_mapping.NEAREST_REACH} of the ones given is accepted; change several targets"
    )


def choose_layers(src: ModelArch, cfg: PruneConfig, scores: Optional[Scores]) -> list[int]:
    n = src.num_layers
    if cfg.drop_layers:
        drop = sorted({int(i) for i in cfg.drop_layers})
        require(
            all(0 <= i < n for i in drop), f"prune.drop_layers={drop} has layers outside 0..{n - 1}"
        )
        require(len(drop) < n, "prune.drop_layers would drop every layer; keep at least one")
        return [i for i in range(n) if i not in drop]
    keep = cfg.target.num_layers or n
    if keep == n:
        return list(range(n))
    require(scores is not None, "depth pruning needs scores= from minitron importance")
    require(
        cfg.depth_metric in DEPTH_METRICS,
        f"prune.depth_metric={cfg.depth_metric!r}: use one of {DEPTH_METRICS}",
    )
    drop_n = n - keep
    if cfg.depth_metric == "block_loss":
        key = f"layer_loss.block{drop_n}"
        require(
            key in scores.tensors,
            f"the scores have no LM loss for removing {drop_n} contiguous layers; re-run "
            f"minitron importance with importance.block_sizes=[{drop_n}] (or use "
            "prune.depth_metric=layer_loss)",
        )
        start = top_k(-scores.tensors[key], 1)[0]  # the block whose removal hurts least
        return [i for i in range(n) if not start <= i < start + drop_n]
    if cfg.depth_metric == "layer_loss":
        require(
            "layer_loss.block1" in scores.tensors,
            "the scores have no single-layer removal loss; re-run importance with "
            "importance.block_sizes=[1]",
        )
        return top_k(scores.tensors["layer_loss.block1"], keep)  # high loss without it = keep
    return top_k(scores.tensors["layer_bi"], keep)


def make_plan(
    src: ModelArch,
    cfg: PruneConfig,
    scores: Optional[Scores],
    hf_base: Optional[dict] = None,
    tp: int = 1,
) -> PrunePlan:
    """``hf_base`` and ``tp``: the source's HF config and the TP size, for the export check
    (:func:`check_exportable`)."""
    dst = check_target(src, cfg.target, hf_base, tp)
    kept_layers = choose_layers(src, cfg, scores)
    dst = dst.replace(num_layers=len(kept_layers))
    agg = cfg.agg or None
    width = _sizes(dst) != _sizes(src)
    require(scores is not None or not width, "width pruning needs scores= from minitron importance")
    require(
        cfg.expert_metric in EXPERT_METRICS,
        f"prune.expert_metric={cfg.expert_metric!r}: use one of {EXPERT_METRICS}",
    )
    require(
        cfg.moe_neurons in MOE_NEURONS,
        f"prune.moe_neurons={cfg.moe_neurons!r}: use one of {MOE_NEURONS}",
    )
    hidden = None
    if dst.hidden_size != src.hidden_size:
        hidden = top_k(scores.hidden(kept_layers, agg), dst.hidden_size)
    layers = []
    hpg_new = dst.num_attention_heads // dst.num_query_groups
    for i in kept_layers:
        if scores is None:
            layers.append(
                LayerPlan(
                    list(range(src.num_query_groups)),
                    [list(range(src.heads_per_group))] * src.num_query_groups,
                    [] if src.is_moe else list(range(src.ffn_hidden_size)),
                    *all_experts(src),
                )
            )
            continue
        head = scores.site(i, "heads", agg)
        groups = top_k(group_scores(head, src.num_query_groups), dst.num_query_groups)
        per_group = head.reshape(src.num_query_groups, src.heads_per_group)
        heads = [top_k(per_group[g], hpg_new) for g in groups]
        if src.is_moe:
            layers.append(LayerPlan(groups, heads, [], *kept_experts(scores, i, dst, cfg)))
        else:
            neurons = top_k(scores.site(i, "mlp", agg), dst.ffn_hidden_size)
            layers.append(LayerPlan(groups, heads, neurons))
    return PrunePlan(src, dst, kept_layers, hidden, layers)


def _sizes(arch: ModelArch) -> tuple:
    """The widths width pruning changes (the MoE ones None for a dense model)."""
    return (
        arch.hidden_size,
        arch.ffn_hidden_size,
        arch.num_attention_heads,
        arch.num_query_groups,
        arch.num_moe_experts,
        arch.moe_ffn_hidden_size,
    )
