"""Model architecture description shared by every stage.

:class:`ModelArch` names the shape of a decoder-only model with Megatron's own field names.  It is
what checkpoints store, what pruning shrinks, and what :mod:`minitron_mcore.models.build` turns
into a Megatron ``TransformerConfig`` + ``GPTModel``.  Ready presets live in ``conf/model/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from minitron_mcore.errors import MinitronError, require

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")


@dataclass
class ModelArch:
    """Shape and numerics of a Llama-style GPT (RMSNorm, RoPE, SwiGLU, GQA)."""

    family: str = "llama"
    """``llama`` (Llama 3.x), ``mistral`` (Mistral / Mistral NeMo), ``qwen2`` (Qwen2/2.5),
    ``qwen3`` (Qwen3 dense); mixture-of-experts: ``mixtral``, ``qwen3_moe``."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Embedding / residual width."""
    ffn_hidden_size: int = 128
    """Width of each half of the SwiGLU MLP (HF ``intermediate_size``)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (GQA groups); equals ``num_attention_heads`` for plain MHA."""
    kv_channels: Optional[int] = None
    """Head dimension; ``None`` means ``hidden_size // num_attention_heads``.  Mistral NeMo uses
    128 with hidden 5120 and 32 heads, so it is stored explicitly there."""
    vocab_size: int = 256
    """Tokenizer vocabulary (unpadded). Padding for TP happens when the model is built."""
    max_position_embeddings: int = 2048
    """Longest sequence the model is meant for (HF ``max_position_embeddings``)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rope_scaling_factor: Optional[float] = None
    """Llama-3 RoPE frequency scaling factor (8 for Llama 3.1, 32 for 3.2); ``None`` = off."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer (Llama 3.2 1B/3B, small Qwen2.5)."""
    qkv_bias: bool = False
    """Bias on the fused QKV projection (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm of every query and key head over the head dimension, before RoPE (Qwen3; Megatron
    ``qk_layernorm``): one weight of ``kv_channels`` values for all query heads, one for all key
    heads, in every layer."""
    num_moe_experts: Optional[int] = None
    """Mixture of experts: routed experts in every layer's MLP (``None``: a dense MLP)."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: Optional[int] = None
    """Width of each half of an expert's SwiGLU MLP (HF ``moe_intermediate_size``, Mixtral's
    ``intermediate_size``); ``ffn_hidden_size`` is then unused."""
    moe_norm_topk_prob: bool = True
    """The top-k routing probabilities renormalised to sum to 1 (Mixtral; Qwen3-MoE's
    ``norm_topk_prob``); false: the softmax over all experts, cut to the top k."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss while training (HF ``router_aux_loss_coef``)."""
    init_std: float = 0.02
    """Std of the normal initialisation when a model is built from scratch."""

    def __post_init__(self):
        require(
            self.family in FAMILIES,
            f"model.family={self.family!r} is not supported; use one of {', '.join(FAMILIES)}",
        )
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "vocab_size",
        ):
            require(getattr(self, name) > 0, f"model.{name} must be positive")
        require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
            f"model.num_query_groups={self.num_query_groups}; pick a group count that divides it",
        )
        if self.kv_channels is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                "model.hidden_size must be divisible by model.num_attention_heads "
                "unless model.kv_channels is set",
            )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.is_moe:
            require(
                0 < self.moe_router_topk <= self.num_moe_experts,
                f"model.moe_router_topk={self.moe_router_topk} must be between 1 and "
                f"model.num_moe_experts={self.num_moe_experts}",
            )
            require(
                self.moe_router_topk > 1 or not self.moe_norm_topk_prob,
                "top-1 routing with renormalised probabilities gives every token a weight of 1, "
                "which Megatron's router refuses; keep moe_router_topk >= 2",
            )

    @property
    def is_moe(self) -> bool:
        return bool(self.num_moe_experts)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArch:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MinitronError(f"unknown model fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> ModelArch:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (unpadded vocab), as Hugging Face would report it."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attn += 2 * d if self.qk_norm else 0
        if self.is_moe:  # the router and every expert's SwiGLU MLP
            f = self.moe_ffn_hidden_size or f
            layer = attn + self.num_moe_experts * (h + 3 * h * f) + 2 * h
        else:
            layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + emb + h

    def check_parallel(self, tp: int, pp: int, ep: int = 1) -> None:
        """One-line errors for a TP/PP(/EP) layout this model cannot be split into."""
        require(
            not self.is_moe or self.num_moe_experts % ep == 0,
            f"parallel.ep={ep} does not divide num_moe_experts={self.num_moe_experts}; choose an "
            "expert-parallel size that divides the expert count",
        )
        require(tp >= 1 and pp >= 1, "parallel.tp and parallel.pp must be >= 1")
        require(
            self.num_attention_heads % tp == 0,
            f"parallel.tp={tp} does not divide num_attention_heads={self.num_attention_heads}; "
            "choose a TP size that divides the head count",
        )
        require(
            self.num_query_groups % tp == 0,
            f"parallel.tp={tp} does not divide num_query_groups={self.num_query_groups}; "
            "choose a TP size that divides the number of query groups (KV heads)",
        )
        ffn_key, ffn = (
            ("moe_ffn_hidden_size", self.moe_ffn_hidden_size or self.ffn_hidden_size)
            if self.is_moe
            else ("ffn_hidden_size", self.ffn_hidden_size)
        )
        require(ffn % tp == 0, f"parallel.tp={tp} does not divide {ffn_key}={ffn}")
        require(
            self.num_layers % pp == 0,
            f"parallel.pp={pp} does not divide num_layers={self.num_layers}; "
            "choose a PP size that divides the layer count",
        )


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """Vocabulary padded to ``multiple`` (a power of two, so any usual TP size divides it).

    The padding does not depend on the TP size, so a checkpoint keeps the same global shapes
    when it is resharded to another TP size.
    """
    return -(-vocab_size // multiple) * multiple


def preset_names() -> list[str]:
    import os

    from minitron_mcore.utils.config import conf_dir

    return sorted(
        f[:-5] for f in os.listdir(os.path.join(conf_dir(), "model")) if f.endswith(".yaml")
    )


def load_preset(name: str) -> ModelArch:
    """A ready model shape from ``conf/model/<name>.yaml`` (a typo in a field fails)."""
    import os

    from omegaconf import OmegaConf

    from minitron_mcore.utils.config import conf_dir

    path = os.path.join(conf_dir(), "model", f"{name}.yaml")
    require(os.path.isfile(path), f"model={name!r} is not a preset; choose one of {preset_names()}")
    merged = OmegaConf.merge(OmegaConf.structured(ModelArch), OmegaConf.load(path))
    return OmegaConf.to_object(merged)
