"""``importance`` + ``prune`` on a GPU against the same commands on the CPU.

    python3 -m pytest -q -m gpu tests/gpu/test_prune_gpu.py

On the CPU suite's ``llama_ckpt`` (fp32; TF32 off on the GPU): every stored score (all
aggregations, block importance, the layer-removal losses) within 1e-3 of the CPU's, relative to
the largest score of its tensor; the prune plan's kept indices (hidden channels, neurons, heads,
query groups, layers) identical; the pruned checkpoints' weights bitwise equal. The smallest gap
between two neighbouring scores of this model is ~2e-5 of the largest (measured), against
~1e-6 of fp32 summation-order noise, so the ranking is stable where it is compared.
"""

from __future__ import annotations

import pytest
import torch
from conftest import canonical_weights

from minitron_mcore.checkpoint.megatron import read_meta
from minitron_mcore.importance.scores import Scores

from .common import CPU, GPU_FP32, cli

pytestmark = pytest.mark.gpu

SCORE_RTOL = 1e-3
IMPORTANCE = [
    "importance.num_samples=8",
    "importance.seq_length=32",
    "importance.micro_batch_size=2",
    "importance.layer_loss_samples=4",
    "importance.block_sizes=[1,2]",
]
# Every axis at once: hidden 64->48, ffn 96->64, 2 of 4 heads (1 per group), 2 of 4 layers
# (the contiguous block whose removal costs least, from the layer-removal losses).
TARGET = [
    "prune.target.hidden_size=48",
    "prune.target.ffn_hidden_size=64",
    "prune.target.num_attention_heads=2",
    "prune.target.num_layers=2",
]
PLAN_KEYS = ("hidden", "layers", "kept_layers", "dropped_layers")


def importance_and_prune(ckpt: str, data: str, root, env: dict):
    root.mkdir()
    scores, out = str(root / "scores"), str(root / "pruned")
    cli(["importance", f"load={ckpt}", f"save={scores}", f"data.train=[{data}]", *IMPORTANCE], env)
    cli(["prune", f"load={ckpt}", f"scores={scores}", f"save={out}", *TARGET], env)
    return Scores.load(scores).tensors, read_meta(out).prune_plan, canonical_weights(out)


def test_importance_and_prune_on_gpu_equal_cpu(llama_ckpt, corpora, tmp_path):
    data = corpora["stdlib-code"]
    gpu = importance_and_prune(llama_ckpt, data, tmp_path / "gpu", GPU_FP32)
    cpu = importance_and_prune(llama_ckpt, data, tmp_path / "cpu", CPU)
    (gs, gplan, gw), (cs, cplan, cw) = gpu, cpu
    assert set(gs) == set(cs) and cs
    for k, ref in cs.items():
        err = (gs[k].double() - ref.double()).abs().max().item()
        assert err <= SCORE_RTOL * ref.double().abs().max().item() + 1e-12, (k, err)
    for key in PLAN_KEYS:
        assert gplan[key] == cplan[key], (key, gplan[key], cplan[key])
    assert gw.keys() == cw.keys()
    for k in cw:
        assert gw[k].dtype == cw[k].dtype and torch.equal(gw[k], cw[k]), k
