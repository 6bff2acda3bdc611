"""Transformer Engine spec vs local spec on one GPU: the same checkpoint gives the same logits.

    python3 -m pytest -q -m gpu tests/gpu/test_te_spec.py

The checkpoint is the CPU suite's ``llama_ckpt`` (``minitron import-hf`` of the tiny random
Llama, fp32); a worker process (``te_logits.py``) builds it with
``build_model_for_stage(..., use_te=True/False)`` through ``load_model`` and writes the logits.
In fp32 without TF32 both specs must equal Hugging Face's own logits as tightly as the CPU
import test does; in bf16 both must stay within bf16 rounding of each other and of them.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from conftest import hf_logits, launch
from safetensors import safe_open
from safetensors.torch import load_file

from .common import GPU_FP32, max_abs, rel_fro

pytestmark = pytest.mark.gpu

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "te_logits.py")
FP32_ATOL = 1e-4  # tests/test_hf_roundtrip.py's bound for our logits against HF's
BF16_REL = 0.04  # |a - b| / |b| over all logits (measured bf16 vs fp32 on CPU: 0.011)
BF16_MAX = 0.08  # max |a - b| / max |b| (measured: 0.015)


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None,
    reason="transformer_engine is not installed: the TE spec cannot be built (NGC images ship it)",
)
def test_te_spec_logits_equal_local_spec(llama_ckpt, hf_models, tokens, tokens_file, tmp_path):
    out = str(tmp_path / "logits.safetensors")
    launch([WORKER, llama_ckpt, tokens_file, out], env=GPU_FP32)
    with safe_open(out, "pt") as f:
        meta = f.metadata() or {}
    if "te_error" in meta:
        pytest.skip(f"transformer_engine does not import: {meta['te_error']}")
    got = load_file(out)
    # The specs really differ where they should: TE's attention against our SDPA one.
    assert meta["te_attention"].startswith("TE"), meta
    assert meta["local_attention"] == "SDPAttention", meta
    ref = hf_logits(hf_models["llama"], tokens)  # [b, s, vocab] fp32, computed on the CPU
    assert got["te_fp32"].shape == got["local_fp32"].shape == ref.shape
    for name in ("te_fp32", "local_fp32"):
        assert max_abs(got[name], ref) <= FP32_ATOL, (name, max_abs(got[name], ref))
    assert max_abs(got["te_fp32"], got["local_fp32"]) <= FP32_ATOL
    bound = BF16_MAX * ref.abs().max().item()
    for a, b in (("te_bf16", "local_bf16"), ("te_bf16", None), ("local_bf16", None)):
        other = ref if b is None else got[b]
        assert rel_fro(got[a], other) <= BF16_REL, (a, b, rel_fro(got[a], other))
        assert max_abs(got[a], other) <= bound, (a, b, max_abs(got[a], other), bound)
