"""Tiny random Hugging Face models of every supported family, written to a local directory."""

from __future__ import annotations

import glob
import os
import sysconfig

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]

# Shapes chosen to exercise what differs between the families: GQA everywhere, Llama-3 RoPE
# scaling, a head dim that is not hidden/heads (Mistral NeMo, Qwen3), QKV bias (Qwen2), per-head
# query/key norms (Qwen3), tied embeddings.
# The shape every family shares ...
_SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# ... and what each family sets on top of it.
TINY = {
    "llama": dict(
        _SHAPE,
        model_type="llama",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=16384,
        rms_norm_eps=1e-05,
        tie_word_embeddings=False,
    ),
    "llama-tied": dict(
        _SHAPE,
        model_type="llama",
        rope_theta=500000.0,
        max_position_embeddings=2048,
        rms_norm_eps=1e-05,
        tie_word_embeddings=True,
    ),
    "mistral": dict(
        _SHAPE,
        model_type="mistral",
        head_dim=32,
        rope_theta=1000000.0,
        max_position_embeddings=2048,
        sliding_window=None,
        rms_norm_eps=1e-05,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        _SHAPE,
        model_type="qwen2",
        rope_theta=1000000.0,
        max_position_embeddings=2048,
        rms_norm_eps=1e-06,
        tie_word_embeddings=True,
        use_sliding_window=False,
    ),
    "qwen3": dict(
        _SHAPE,
        model_type="qwen3",
        head_dim=32,
        rope_theta=1000000.0,
        max_position_embeddings=2048,
        rms_norm_eps=1e-06,
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
    ),
    # Mixture of experts: 4 experts, 2 per token, narrower than the dense FFN.
    "mixtral": dict(
        _SHAPE,
        model_type="mixtral",
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_theta=1000000.0,
        max_position_embeddings=2048,
        sliding_window=None,
        rms_norm_eps=1e-05,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.02,
    ),
    "qwen3_moe": dict(
        _SHAPE,
        model_type="qwen3_moe",
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        rope_theta=1000000.0,
        max_position_embeddings=2048,
        rms_norm_eps=1e-06,
        tie_word_embeddings=False,
        attention_bias=False,
        use_sliding_window=False,
        router_aux_loss_coef=0.001,
    ),
}


def stdlib_texts(max_files: int = 40, max_chars: int = 400_000) -> list[str]:
    """Source text of Python standard-library modules: text every machine already has."""
    root = sysconfig.get_paths()["stdlib"]
    texts, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py")))[:max_files]:
        with open(path, encoding="utf-8", errors="ignore") as f:
            t = f.read()
        texts.append(t)
        total += len(t)
        if total > max_chars:
            break
    return texts


def make_tokenizer(out_dir: str, vocab_size: int = 512, texts: list[str] | None = None) -> str:
    """Train a small byte-level BPE tokenizer locally and save it in HF format."""
    from minitron_mcore.data.demo import bpe_tokenizer

    return bpe_tokenizer(out_dir, texts or stdlib_texts(), vocab_size)


def make_hf_model(
    family: str,
    out_dir: str,
    seed: int = 0,
    dtype=torch.float32,
    tokenizer_dir: str | None = None,
    **overrides,
) -> str:
    """Write a random ``family`` model (+ tokenizer) to ``out_dir`` with ``save_pretrained``.

    Weights are redrawn with a larger spread than HF's init (and norms/biases made non-trivial),
    so that a wrong mapping shows up as a large logit difference.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.makedirs(out_dir, exist_ok=True)
    if tokenizer_dir is None:
        make_tokenizer(out_dir)
    else:
        AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    spec = dict(TINY[family], **overrides)
    spec.setdefault("vocab_size", len(tok))
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.to(dtype).save_pretrained(out_dir)
    return out_dir
