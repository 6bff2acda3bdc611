"""Mixture-of-experts families between Hugging Face and Megatron: their config fields and their
router and expert tensors (``checkpoint.hf_mapping`` maps the rest of each layer).

Hugging Face checkpoints (on the Hub, and as ``save_pretrained`` writes them) hold one tensor per
expert and projection; Megatron's ``MoELayer`` stacks them per layer (``models/canonical.py``):

==================  ==========================================  ==============================
                    Mixtral (``block_sparse_moe.``)             Qwen3-MoE (``mlp.``)
==================  ==========================================  ==============================
router [E, h]       ``gate.weight``                             ``gate.weight``
expert e: gate      ``experts.{e}.w1.weight``                   ``experts.{e}.gate_proj.weight``
expert e: up        ``experts.{e}.w3.weight``                   ``experts.{e}.up_proj.weight``
expert e: down      ``experts.{e}.w2.weight``                   ``experts.{e}.down_proj.weight``
==================  ==========================================  ==============================

Routing: both take the top k of the router's softmax; Mixtral (and Qwen3-MoE with
``norm_topk_prob``, as every released Qwen3-MoE) renormalises the k probabilities - Megatron's
default, the softmax over the top k logits - and Qwen3-MoE without it keeps the softmax over all
experts (Megatron's ``moe_router_pre_softmax``).
"""

from __future__ import annotations

import torch

from minitron_mcore.errors import require
from minitron_mcore.models.arch import ModelArch
from minitron_mcore.models.canonical import EXPERT_FC1, EXPERT_FC2, ROUTER

MOE_TYPES = ("mixtral", "qwen3_moe")
_NAMES = {  # family -> (prefix in the layer, gate, up, down)
    "mixtral": ("block_sparse_moe.", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp.", "gate_proj", "up_proj", "down_proj"),
}


def moe_arch_fields(cfg: dict, model_type: str) -> dict:
    """The ``ModelArch`` fields of a mixture-of-experts ``config.json`` (one error line for
    what Megatron's ``MoELayer`` in every layer cannot compute)."""
    if model_type == "mixtral":
        experts, ffn = cfg.get("num_local_experts"), cfg.get("intermediate_size")
        norm = True
    else:
        require(
            cfg.get("decoder_sparse_step", 1) == 1 and not cfg.get("mlp_only_layers"),
            "Qwen3-MoE configs with dense layers (decoder_sparse_step > 1 or mlp_only_layers) "
            "are not supported; every layer must be a mixture of experts",
        )
        # (the Hub's configs say num_experts; transformers 5 writes num_local_experts)
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        ffn = cfg.get("moe_intermediate_size")
        norm = bool(cfg.get("norm_topk_prob", False))
    require(
        experts and experts > 1 and ffn,
        f"config.json of a {model_type} model lacks its expert count or expert width",
    )
    return dict(
        num_moe_experts=int(experts),
        moe_router_topk=int(cfg.get("num_experts_per_tok", 2)),
        moe_ffn_hidden_size=int(ffn),
        moe_norm_topk_prob=norm,
        moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef") or 0.0),
    )


def moe_hf_fields(arch: ModelArch) -> dict:
    """The mixture-of-experts fields of the ``config.json`` written for ``arch``."""
    common = dict(
        num_experts_per_tok=arch.moe_router_topk,
        router_aux_loss_coef=arch.moe_aux_loss_coeff,
        output_router_logits=False,
    )
    if arch.family == "mixtral":
        return dict(
            common,
            num_local_experts=arch.num_moe_experts,
            intermediate_size=arch.moe_ffn_hidden_size,
        )
    return dict(
        common,
        num_experts=arch.num_moe_experts,
        moe_intermediate_size=arch.moe_ffn_hidden_size,
        norm_topk_prob=arch.moe_norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def expert_names(arch: ModelArch) -> list[str]:
    """The HF names (within a layer) of the router and every expert's projections."""
    pre, *proj = _NAMES[arch.family]
    names = [pre + "gate.weight"]
    for e in range(arch.num_moe_experts):
        names += [f"{pre}experts.{e}.{p}.weight" for p in proj]
    return names


def hf_experts_to_canonical(get, layer_prefix: str, arch: ModelArch) -> dict[str, torch.Tensor]:
    """One layer's router and experts, stacked: fc1 ``[E, 2f, h]`` as [gate; up] per expert
    (Megatron's SwiGLU halves), fc2 ``[E, h, f]``."""
    pre, gate, up, down = _NAMES[arch.family]
    p = layer_prefix + pre
    experts = range(arch.num_moe_experts)
    fc1 = [
        torch.cat([get(f"{p}experts.{e}.{gate}.weight"), get(f"{p}experts.{e}.{up}.weight")])
        for e in experts
    ]
    return {
        ROUTER: get(p + "gate.weight"),
        EXPERT_FC1: torch.stack(fc1),
        EXPERT_FC2: torch.stack([get(f"{p}experts.{e}.{down}.weight") for e in experts]),
    }


def canonical_experts_to_hf(t: dict[str, torch.Tensor], layer_prefix: str, arch: ModelArch) -> dict:
    """The inverse of :func:`hf_experts_to_canonical`, for whichever of the keys ``t`` holds."""
    pre, gate, up, down = _NAMES[arch.family]
    p = layer_prefix + pre
    out = {}
    if ROUTER in t:
        out[p + "gate.weight"] = t[ROUTER]
    for e in range(arch.num_moe_experts) if EXPERT_FC1 in t else ():
        out[f"{p}experts.{e}.{gate}.weight"], out[f"{p}experts.{e}.{up}.weight"] = torch.chunk(
            t[EXPERT_FC1][e], 2
        )
    for e in range(arch.num_moe_experts) if EXPERT_FC2 in t else ():
        out[f"{p}experts.{e}.{down}.weight"] = t[EXPERT_FC2][e]
    return out
