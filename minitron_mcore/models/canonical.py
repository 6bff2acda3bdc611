"""Megatron's canonical tensors of a GPT layer stack, named as ``sharded_state_dict`` names them
(global, with the layer index as a leading axis), and their layouts: the fused QKV grouped per
query group, SwiGLU's fc1 as [gate; up]. HF import/export, pruning and distillation all work on
these names."""

from __future__ import annotations

import torch

from minitron_mcore.models.arch import ModelArch

QKV = "decoder.layers.self_attention.linear_qkv.weight"
QKV_BIAS = "decoder.layers.self_attention.linear_qkv.bias"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
INPUT_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
EMBED = "embedding.word_embeddings.weight"
# A mixture-of-experts layer: its pre-MLP norm is a module of its own (Transformer Engine's
# spec names it so; the local spec's key map is set to match), then the router and experts.
MOE_MLP_NORM = "decoder.layers.pre_mlp_layernorm.weight"
ROUTER = "decoder.layers.mlp.router.weight"
EXPERT_FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
Q_NORM = "decoder.layers.self_attention.q_layernorm.weight"
K_NORM = "decoder.layers.self_attention.k_layernorm.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch):
    """HF separate q/k/v ([n*d, ...]) -> Megatron fused QKV, grouped per query group as
    [q heads of group g, k_g, v_g] for g = 0..groups-1."""
    g, d, hpg = arch.num_query_groups, arch.kv_channels, arch.heads_per_group
    rest = q.shape[1:]
    q = q.reshape(g, hpg * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(g * (hpg + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, arch: ModelArch):
    """Inverse of :func:`interleave_qkv`."""
    g, d, hpg = arch.num_query_groups, arch.kv_channels, arch.heads_per_group
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (hpg + 2) * d, *rest)
    q, k, v = torch.split(grouped, [hpg * d, d, d], dim=1)
    return (q.reshape(g * hpg * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest))


def layer_keys(arch: ModelArch) -> list[str]:
    """The per-layer canonical tensors of ``arch`` (a mixture of experts: the router ``[E, h]``
    and the experts' stacked ``[E, 2f, h]`` / ``[E, h, f]`` instead of the dense MLP)."""
    mlp = [MOE_MLP_NORM, ROUTER, EXPERT_FC1, EXPERT_FC2] if arch.is_moe else [MLP_NORM, FC1, FC2]
    keys = [QKV, PROJ, INPUT_NORM, *mlp]
    return keys + ([QKV_BIAS] if arch.qkv_bias else []) + ([Q_NORM, K_NORM] if arch.qk_norm else [])


def layer_shapes(arch: ModelArch) -> dict[str, tuple]:
    """Global shape of every per-layer canonical tensor of ``arch``."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.kv_channels
    qkv = arch.num_query_groups * (arch.heads_per_group + 2) * d
    shapes = {
        QKV: (qkv, h),
        PROJ: (h, arch.num_attention_heads * d),
        INPUT_NORM: (h,),
    }
    if arch.is_moe:
        e, fe = arch.num_moe_experts, arch.moe_ffn_hidden_size or f
        shapes.update({MOE_MLP_NORM: (h,), ROUTER: (e, h)})
        shapes.update({EXPERT_FC1: (e, 2 * fe, h), EXPERT_FC2: (e, h, fe)})
    else:
        shapes.update({MLP_NORM: (h,), FC1: (2 * f, h), FC2: (h, f)})
    if arch.qkv_bias:
        shapes[QKV_BIAS] = (qkv,)
    if arch.qk_norm:
        shapes[Q_NORM] = shapes[K_NORM] = (d,)
    return shapes


def global_keys(arch: ModelArch) -> list[str]:
    """The canonical tensors outside the layers: embeddings, final norm, output layer."""
    return [EMBED, FINAL_NORM] + ([] if arch.tie_embeddings else [OUTPUT])
