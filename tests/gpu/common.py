"""What the GPU tests share: where a command runs, one short training run through the CLI, and
how two runs are compared.

    python3 -m pytest -q -m gpu        # runs every test that uses these (on a GPU machine)

Every run is a fresh process started by ``launch`` of ``tests/conftest.py``. A GPU run sees the
machine's GPUs; a CPU run gets ``CUDA_VISIBLE_DEVICES=""``, so torch finds no GPU and minitron
takes the CPU compat path that the CPU suite tests - the same command, the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import canonical_weights, launch, read_log

CPU = {"CUDA_VISIBLE_DEVICES": ""}
# fp32 on the GPU is compared tightly with the CPU, so TF32 must stay off: NGC images switch it
# on for every fp32 cuBLAS matmul (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1), and NVIDIA_TF32_OVERRIDE=0
# also stops the libraries underneath (cuBLAS, cuDNN, Transformer Engine's GEMMs) from using it.
GPU_FP32 = {"NVIDIA_TF32_OVERRIDE": "0", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "0"}
GPU = {}  # as users run it

# Tolerances. fp32 GPU vs fp32 CPU (and 2 GPUs vs 1) differ only by summation order, ~1e-6
# relative: the CPU suite's TP/PP bound (1e-4) holds for losses and gradient norms.
TIGHT_RTOL = 1e-4
TIGHT_UPDATE = 1e-3  # |update_a - update_b| / |update_b| over all weights together
TIGHT_UPDATE_PER_TENSOR = 1e-2  # the same per tensor (a wrong slice or bias shows here)
# bf16 GPU vs fp32 CPU: bf16 keeps 8 bits of mantissa, so logits move by ~1 % (measured on the
# tiny Llama: 1.1 % relative, 1.5 % of the largest logit at most).
LOOSE_LOSS_RTOL = 5e-2
LOOSE_GRAD_RTOL = 1e-1
LOOSE_UPDATE_COS = 0.9


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def no_gpu_reason(needed: int = 1) -> str | None:
    """Why a test that needs ``needed`` GPUs cannot run here; None when it can."""
    n = visible_gpus()
    if n >= needed:
        return None
    if n == 0:
        return (
            "no CUDA GPU visible (torch.cuda.is_available() is False); the GPU set runs on a "
            "GPU machine: bash benchmarks/gpu_check.sh"
        )
    return f"needs {needed} CUDA GPUs, {n} visible"


def requires_gpus(n: int):
    reason = no_gpu_reason(n)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def cli(args: list[str], env: dict, nproc: int = 1):
    """``[torchrun ...] python -m minitron_mcore *args`` with ``env`` added."""
    return launch(["-m", "minitron_mcore", *args], nproc=nproc, env=env)


@dataclass
class Run:
    """A finished training run: its per-step log rows and its saved weights."""

    rows: list[dict]
    weights: dict[str, torch.Tensor]


def train_run(args: list[str], save: str, env: dict, nproc: int = 1) -> Run:
    cli([*args, f"save={save}"], env, nproc)
    rows = [r for r in read_log(save + ".logs/train_log.jsonl") if "train/loss" in r]
    return Run(rows, canonical_weights(save))


def assert_rows_close(got: list[dict], ref: list[dict], rtols: dict[str, float]) -> None:
    """Same steps, same learning rates, and every ``key`` within its relative tolerance."""
    assert [r["step"] for r in got] == [r["step"] for r in ref] and ref, (got, ref)
    for g, r in zip(got, ref):
        assert g["train/lr"] == pytest.approx(r["train/lr"], rel=1e-9), (g, r)
        for key, rtol in rtols.items():
            assert math.isfinite(g[key]), (key, g)
            assert abs(g[key] - r[key]) <= rtol * abs(r[key]), (key, g[key], r[key], rtol)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def update_stats(start: dict, got: dict, ref: dict) -> dict:
    """Compare what two runs did to the same starting weights.

    Each run's update is its saved weights minus ``start`` rounded to the run's dtype (a bf16
    run starts from bf16-rounded weights). Returns the relative distance of the two updates
    over all weights together (``rel``) and per tensor (``per_tensor``), and their cosine.
    Updates rather than weights: after a step the weights differ from the start by ~lr, so a
    bound on the weights would hide a wrong step under the size of the weights themselves."""
    assert got.keys() == ref.keys() == start.keys(), (sorted(got), sorted(ref))
    ups_got, ups_ref, per_tensor = [], [], {}
    for k in sorted(ref):
        a = got[k].double() - start[k].to(got[k].dtype).double()  # [*shape]
        b = ref[k].double() - start[k].to(ref[k].dtype).double()
        per_tensor[k] = _rel(a, b)
        ups_got.append(a.flatten())
        ups_ref.append(b.flatten())
    a, b = torch.cat(ups_got), torch.cat(ups_ref)  # [all weights]
    cos = (a @ b / (a.norm() * b.norm()).clamp(min=1e-30)).item()
    return {"rel": _rel(a, b), "cos": cos, "per_tensor": per_tensor}


def assert_same_update(start: dict, got: Run, ref: Run) -> None:
    s = update_stats(start, got.weights, ref.weights)
    assert s["rel"] <= TIGHT_UPDATE, s["rel"]
    worst = max(s["per_tensor"], key=s["per_tensor"].get)
    assert s["per_tensor"][worst] <= TIGHT_UPDATE_PER_TENSOR, (worst, s["per_tensor"][worst])


def assert_similar_update(start: dict, got: Run, ref: Run) -> None:
    s = update_stats(start, got.weights, ref.weights)
    assert s["cos"] >= LOOSE_UPDATE_COS, s["cos"]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return _rel(a.double(), b.double())
