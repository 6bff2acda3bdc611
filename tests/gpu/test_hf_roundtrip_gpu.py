"""``import-hf`` then ``export-hf`` with a GPU visible gives back the Hugging Face weights
exactly, as tests/test_hf_roundtrip.py checks on the CPU.

    python3 -m pytest -q -m gpu tests/gpu/test_hf_roundtrip_gpu.py

Two cases between them cover what differs between families: the tiny Llama in fp32 (untied
output layer, Llama-3 RoPE scaling) and the tiny Qwen2 saved in bf16 (tied embeddings, QKV
bias, dtype kept end to end). Every tensor must be bitwise equal, with the same name and dtype.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from .common import GPU, cli

pytestmark = pytest.mark.gpu

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def bf16_copy(hf_dir: str, dst: str) -> str:
    """The HF model of ``hf_dir`` saved in bf16, with its tokenizer."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(hf_dir).to(torch.bfloat16).save_pretrained(dst)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(hf_dir, name), os.path.join(dst, name))
    return dst


@pytest.mark.parametrize(
    "family,dtype",
    [("llama", torch.float32), ("qwen2", torch.bfloat16)],
    ids=["llama-fp32", "qwen2-bf16"],
)
def test_roundtrip_on_gpu_is_exact(family, dtype, hf_models, tmp_path):
    from transformers import AutoModelForCausalLM

    src = hf_models[family]
    if dtype == torch.bfloat16:
        src = bf16_copy(src, str(tmp_path / "src"))
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    cli(["import-hf", f"load={src}", f"save={ckpt}"], GPU)
    cli(["export-hf", f"load={ckpt}", f"save={out}"], GPU)
    a = AutoModelForCausalLM.from_pretrained(src).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert sorted(a) == sorted(b)
    for name, ref in a.items():
        assert ref.dtype == b[name].dtype == dtype, (name, ref.dtype, b[name].dtype)
        assert torch.equal(b[name], ref), name
