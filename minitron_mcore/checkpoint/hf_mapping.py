"""Pure conversions between Hugging Face Llama/Mistral/Qwen2 weights and Megatron's layout.

"Canonical" tensors are the global (unsharded) tensors that Megatron's ``dist_checkpointing``
stores, keyed by Megatron's sharded-state-dict keys; per-layer keys (``decoder.layers.*``) are
given per layer.  Megatron's checkpoint keys are spec-neutral (the local spec maps its norms onto
the Transformer Engine names), so one mapping serves both specs.

No library converts HF <-> Megatron-Core for these families without pulling in NeMo or
Megatron-LM's training scripts, so the mapping is written here.  The one file access,
:func:`write_classic_rope_keys`, fixes up the ``config.json`` that transformers saved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

from minitron_mcore.checkpoint import hf_moe
from minitron_mcore.errors import MinitronError, require
from minitron_mcore.models.arch import ModelArch

# The canonical names and layouts (models/canonical.py), importable from here as before.
from minitron_mcore.models.canonical import (  # noqa: F401
    EMBED,
    FC1,
    FC2,
    FINAL_NORM,
    INPUT_NORM,
    K_NORM,
    MLP_NORM,
    MOE_MLP_NORM,
    OUTPUT,
    PROJ,
    Q_NORM,
    QKV,
    QKV_BIAS,
    global_keys,
    interleave_qkv,
    layer_keys,
    layer_shapes,
    split_qkv,
)

_HF_LAYER = "model.layers.{i}."
_SIMPLE_LAYER = {
    PROJ: "self_attn.o_proj.weight",
    INPUT_NORM: "input_layernorm.weight",
    MLP_NORM: "post_attention_layernorm.weight",
    FC2: "mlp.down_proj.weight",
}
_QK_NORMS = {Q_NORM: "self_attn.q_norm.weight", K_NORM: "self_attn.k_norm.weight"}


def _simple_layer(arch: ModelArch) -> dict[str, str]:
    """The per-layer tensors that map one to one (canonical key -> HF name in the layer)."""
    simple = dict(_SIMPLE_LAYER)
    if arch.is_moe:  # the experts' projections: checkpoint/hf_moe.py
        del simple[FC2]
        simple[MOE_MLP_NORM] = simple.pop(MLP_NORM)
    return {**simple, **(_QK_NORMS if arch.qk_norm else {})}


SUPPORTED_MODEL_TYPES = {
    t: t for t in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
}
_REQUIRED_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
)
# Expert counts as Mixtral / Qwen2-MoE / DeepSeek name them; a dense family's config holding
# them describes weights that the dense mapping would silently drop.
_MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
# Megatron's built-in Llama-3 RoPE scaling fixes these three values (Llama 3.1 / 3.2 use them).
_LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


# ---------------------------------------------------------------------------- config


def _rope_from_hf(cfg: dict) -> tuple[float, float | None]:
    """(theta, llama3 scaling factor or None) from either the v4 or the v5 config layout."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = (scaling or {}).get("rope_type", scaling.get("type") if scaling else None)
    if rope_type in (None, "default"):
        return float(theta), None
    require(
        rope_type == "llama3",
        f"RoPE scaling type {rope_type!r} is not supported; only Llama-3 scaling or none",
    )
    for key, want in _LLAMA3_FIXED.items():
        got = scaling.get(key, want)
        require(
            float(got) == want,
            f"Llama-3 RoPE scaling with {key}={got} is not supported (Megatron fixes it to {want})",
        )
    return float(theta), float(scaling["factor"])


def _require_full_attention_window(cfg: dict) -> None:
    """Mistral's ``sliding_window``: only a window that covers every position (or none) is the
    full attention that Megatron's GPT layers compute."""
    window = cfg.get("sliding_window")
    max_pos = cfg.get("max_position_embeddings", 2048)
    require(
        window is None or window >= max_pos,
        f"sliding-window attention (sliding_window={window} < max_position_embeddings={max_pos}) "
        "is not supported; use a full-attention model (sliding_window=null), or set "
        f"max_position_embeddings={window} in config.json to train within the window",
    )


def arch_from_hf_config(cfg: dict) -> ModelArch:
    """ModelArch from a Hugging Face ``config.json`` dict; clear errors for what we cannot map."""
    model_type = cfg.get("model_type")
    require(
        model_type in SUPPORTED_MODEL_TYPES,
        f"model_type {model_type!r} is not supported; supported Hugging Face model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}",
    )
    require(
        cfg.get("hidden_act", "silu") == "silu",
        f"hidden_act={cfg.get('hidden_act')!r} is not supported; only SwiGLU (silu) models",
    )
    require(not cfg.get("mlp_bias", False), "models with mlp_bias=true are not supported")
    require(
        not cfg.get("attention_bias", False) or model_type == "qwen2",
        "models with attention_bias=true are not supported for model_type " + model_type,
    )
    if model_type.startswith("qwen"):  # their sliding_window applies with use_sliding_window
        require(
            not cfg.get("use_sliding_window", False),
            f"{model_type.capitalize()} sliding-window attention is not supported; set "
            "use_sliding_window=false",
        )
    else:
        _require_full_attention_window(cfg)
    experts = [k for k in _MOE_FIELDS if (cfg.get(k) or 0) > 1]
    require(
        not experts or model_type in hf_moe.MOE_TYPES,
        f"mixture-of-experts configs ({', '.join(f'{k}={cfg[k]}' for k in experts)}) are not "
        "supported; only dense models (remove the expert fields if the weights are dense)",
    )
    missing = [k for k in _REQUIRED_FIELDS if cfg.get(k) is None]
    require(
        not missing,
        f"config.json lacks {', '.join(missing)}; re-save the model with transformers "
        "(save_pretrained writes every field)",
    )
    theta, factor = _rope_from_hf(cfg)
    heads = cfg["num_attention_heads"]
    return ModelArch(
        family=SUPPORTED_MODEL_TYPES[model_type],
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rotary_base=theta,
        rope_scaling_factor=factor,
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        **(hf_moe.moe_arch_fields(cfg, model_type) if model_type in hf_moe.MOE_TYPES else {}),
        init_std=cfg.get("initializer_range", 0.02),
    )


def hf_config_from_arch(arch: ModelArch, base: dict | None, dtype: str) -> dict:
    """A ``config.json`` dict for ``arch``, keeping the unrelated fields of ``base`` (token ids,
    generation defaults ...)."""
    cfg = {k: v for k, v in (base or {}).items() if k not in ("layer_types", "architectures")}
    rope = {"rope_type": "default", "rope_theta": arch.rotary_base}
    if arch.rope_scaling_factor is not None:
        rope = dict(rope, rope_type="llama3", factor=arch.rope_scaling_factor, **_LLAMA3_FIXED)
    cfg.pop("rope_scaling", None)
    cfg.pop("rope_theta", None)
    if arch.family == "mistral":
        # Our model attends to every position; transformers' MistralConfig defaults to a 4096
        # window, so write the source's covering window back, or null.
        window = cfg.get("sliding_window")
        covers = window is not None and window >= arch.max_position_embeddings
        cfg["sliding_window"] = window if covers else None
    cfg.update(
        model_type=arch.family,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.kv_channels,
        vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_epsilon,
        tie_word_embeddings=arch.tie_embeddings,
        hidden_act="silu",
        rope_parameters=rope,
        dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
    )
    if arch.is_moe:  # one expert-count key: transformers reads either name, the base's first
        for key in ("num_local_experts", "num_experts"):
            cfg.pop(key, None)
        cfg.update(hf_moe.moe_hf_fields(arch))
    return cfg


def with_classic_rope_keys(cfg: dict) -> dict:
    """``cfg`` (a saved ``config.json`` dict) plus the transformers-4 RoPE keys, derived from its
    ``rope_parameters``: ``rope_theta`` (float) and ``rope_scaling`` (null without scaling).

    transformers 5 writes only ``rope_parameters``; transformers 4, vLLM, TensorRT-LLM and
    llama.cpp's converter read the classic keys, and transformers 5 reads either, so an exported
    config carries both.  Configs without a flat ``rope_parameters`` are returned unchanged.
    """
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:
        return dict(cfg)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return dict(cfg, rope_theta=float(params["rope_theta"]), rope_scaling=scaling)


def write_classic_rope_keys(hf_dir: str) -> None:
    """Rewrite ``hf_dir/config.json`` (as saved by transformers) with
    :func:`with_classic_rope_keys`, keeping transformers' JSON formatting."""
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        cfg = with_classic_rope_keys(json.load(f))
    with open(path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------- what transformers accepts

SIZE_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "num_layers",
)
"""The sizes pruning changes (each also a ``prune.target`` key), in the order they are blamed for
a refused config: a hidden size that does not fit the head count is the usual one."""
NEAREST_REACH = 256
"""How far on each side of a refused size :func:`nearest_accepted` looks: at most 2 x 256 config
builds of ~3 ms each, and far more than Llama's rule needs (every multiple of the head count is
accepted, so one lies within heads - 1 of any hidden size)."""


def export_refusal(arch: ModelArch, base: dict | None) -> str | None:
    """Why the installed transformers would refuse the ``config.json`` that ``export-hf`` writes
    for ``arch`` (``base``: the source's config.json, whose unrelated fields the export keeps),
    in its own words; None when it loads. Built by the export's own :func:`hf_config_from_arch`,
    so what ``prune`` checks is what ``export-hf`` writes."""
    from minitron_mcore.checkpoint.hf_io import hf_config_refusal

    return hf_config_refusal(hf_config_from_arch(arch, base, "fp32"))


def nearest_accepted(
    value: int, accepts: Callable[[int], bool], lo: int, hi: int, reach: int = NEAREST_REACH
) -> list[int]:
    """The closest integer below and the closest above ``value`` (within ``reach`` of it and
    within [lo, hi]) that ``accepts``, ascending: one, two or no values."""
    found = []
    for step in (-1, 1):
        v = value + step
        while lo <= v <= hi and abs(v - value) <= reach:
            if accepts(v):
                found.append(v)
                break
            v += step
    return sorted(found)


def refused_size(arch: ModelArch, base: dict | None) -> tuple[str, list[int]] | None:
    """The first of :data:`SIZE_KEYS` that, changed alone, gives a config transformers accepts,
    with its nearest accepted values; None when no single size change nearby does (then the
    family itself is the problem, or two sizes are)."""
    for key in SIZE_KEYS:
        value = getattr(arch, key)

        def accepts(v: int, key: str = key) -> bool:
            try:
                other = arch.replace(**{key: v})
            except MinitronError:  # e.g. heads that the query groups do not divide
                return False
            return export_refusal(other, base) is None

        near = nearest_accepted(value, accepts, 1, value + NEAREST_REACH)
        if near:
            return key, near
    return None


# ---------------------------------------------------------------------------- tensors
# (Megatron side: models/canonical.py; HF name patterns with {i} = the layer index.)


def pad_vocab(w: torch.Tensor, padded: int) -> torch.Tensor:
    """[vocab, h] -> [padded, h]; the extra rows are zero."""
    if w.shape[0] == padded:
        return w
    require(w.shape[0] < padded, f"vocab {w.shape[0]} larger than padded vocab {padded}")
    return torch.cat([w, w.new_zeros(padded - w.shape[0], *w.shape[1:])])


Getter = Callable[[str], torch.Tensor]


def hf_layer_to_canonical(get: Getter, i: int, arch: ModelArch) -> dict[str, torch.Tensor]:
    """One layer: HF tensors (read through ``get``) -> canonical Megatron tensors."""
    p = _HF_LAYER.format(i=i)
    out = {key: get(p + name) for key, name in _simple_layer(arch).items()}
    out[QKV] = interleave_qkv(*(get(p + f"self_attn.{x}_proj.weight") for x in "qkv"), arch)
    if arch.qkv_bias:
        out[QKV_BIAS] = interleave_qkv(*(get(p + f"self_attn.{x}_proj.bias") for x in "qkv"), arch)
    if arch.is_moe:
        return {**out, **hf_moe.hf_experts_to_canonical(get, p, arch)}
    # Megatron's SwiGLU: fc1 = [gate; up], act = silu(gate) * up.
    out[FC1] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
    return out


def hf_global_to_canonical(get: Getter, arch: ModelArch, padded_vocab: int):
    """Non-layer tensors: embeddings, final norm, output layer."""
    out = {
        EMBED: pad_vocab(get("model.embed_tokens.weight"), padded_vocab),
        FINAL_NORM: get("model.norm.weight"),
    }
    if not arch.tie_embeddings:
        out[OUTPUT] = pad_vocab(get("lm_head.weight"), padded_vocab)
    return out


def canonical_layer_to_hf(t: dict[str, torch.Tensor], i: int, arch: ModelArch):
    """One layer: canonical Megatron tensors -> HF state-dict entries.

    Every key converts on its own, so ``t`` may hold any subset of the layer's keys.
    """
    p = _HF_LAYER.format(i=i)
    out = {p + name: t[key] for key, name in _simple_layer(arch).items() if key in t}
    for key, suffix in ((QKV, "weight"), (QKV_BIAS, "bias")):
        if key in t:
            for x, w in zip("qkv", split_qkv(t[key], arch)):
                out[p + f"self_attn.{x}_proj.{suffix}"] = w
    if FC1 in t:
        gate, up = torch.chunk(t[FC1], 2)
        out[p + "mlp.gate_proj.weight"] = gate
        out[p + "mlp.up_proj.weight"] = up
    if arch.is_moe:
        out.update(hf_moe.canonical_experts_to_hf(t, p, arch))
    return out


def canonical_global_to_hf(t: dict[str, torch.Tensor], arch: ModelArch):
    v = arch.vocab_size
    out = {"model.embed_tokens.weight": t[EMBED][:v], "model.norm.weight": t[FINAL_NORM]}
    if not arch.tie_embeddings:
        out["lm_head.weight"] = t[OUTPUT][:v]
    return out


def check_hf_names(names: set[str], arch: ModelArch) -> None:
    """Fail early, with the missing names, if the weights do not match the config."""
    missing = []
    for i in range(arch.num_layers):
        p = _HF_LAYER.format(i=i)
        want = list(_simple_layer(arch).values()) + [f"self_attn.{x}_proj.weight" for x in "qkv"]
        want += (
            hf_moe.expert_names(arch)
            if arch.is_moe
            else ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
        )
        want += [f"self_attn.{x}_proj.bias" for x in "qkv"] if arch.qkv_bias else []
        missing += [p + w for w in want if p + w not in names]
    glob = ["model.embed_tokens.weight", "model.norm.weight"]
    glob += [] if arch.tie_embeddings else ["lm_head.weight"]
    missing += [n for n in glob if n not in names]
    if missing:
        raise MinitronError(
            f"the safetensors weights do not match config.json: {len(missing)} tensors missing "
            f"(first: {missing[0]}); check that the directory holds a complete model"
        )
