"""Training steps on a GPU against the same steps on the CPU, through the CLI.

    python3 -m pytest -q -m gpu tests/gpu/test_train_steps.py

Each run is two optimizer steps of ``pretrain``, ``correct`` or ``distill`` (global batch 8 in
micro-batches of 2, sequence 64; distillation's KD loss in chunks of 48 tokens, so chunks cross
micro-batch rows), once per side:

* ``gpu-fp32`` / ``cpu-fp32``: ``train.precision=fp32``, TF32 off on the GPU. The per-step
  loss and gradient norm must agree within 1e-4 (the CPU suite's TP/PP bound) and the weights'
  updates within 1e-3 (see ``common.update_stats``).
* ``gpu-bf16``: what users run on a GPU (Megatron mixed precision), compared loosely with the
  fp32 CPU run: losses within 5 %, gradient norms within 10 %, update cosine >= 0.9.
* ``gpu-fp32-tp2`` / ``gpu-fp32-pp2`` (two GPUs): distillation at TP=2 and PP=2 against the
  one-GPU run, as tightly as GPU against CPU.

``pretrain`` starts from random weights, which Megatron draws on the GPU from the CUDA generator
and on the CPU from torch's CPU generator: the two runs start from different weights, so only
what does not depend on the draw is compared (learning rates exactly; losses, which at random
initialisation sit at log(vocab) whatever the draw, within 2 %; gradient norms within 50 %).
``correct`` and ``distill`` load a checkpoint, so both sides start from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import canonical_weights
from test_distill import student, teacher  # noqa: F401 - the CPU suite's distillation pair

from .common import (
    CPU,
    GPU,
    GPU_FP32,
    LOOSE_GRAD_RTOL,
    LOOSE_LOSS_RTOL,
    TIGHT_RTOL,
    assert_rows_close,
    assert_same_update,
    assert_similar_update,
    requires_gpus,
    train_run,
)

pytestmark = pytest.mark.gpu

COMMON = [
    "train.steps=2",
    "train.lr=1e-3",
    "train.warmup_steps=0",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_length=64",
    "train.eval_iters=0",
]
FP32 = "train.precision=fp32"
# Several GPUs: the environment launch/torchrun.sh gives them (Megatron orders its overlapped
# tensor-parallel communication with one hardware queue).
GPUS_FP32 = dict(GPU_FP32, CUDA_DEVICE_MAX_CONNECTIONS="1")
SIDES = {  # side -> (environment, extra overrides, processes)
    "gpu-fp32": (GPU_FP32, (FP32,), 1),
    "cpu-fp32": (CPU, (FP32,), 1),
    "gpu-bf16": (GPU, ("train.precision=bf16",), 1),
    "gpu-fp32-tp2": (GPUS_FP32, (FP32, "parallel.tp=2"), 2),
    "gpu-fp32-pp2": (GPUS_FP32, (FP32, "parallel.pp=2"), 2),
}
PRETRAIN_LOSS_RTOL = 2e-2  # random init: loss ~ log(vocab); measured spread over seeds 0.5 %
PRETRAIN_GRAD_RTOL = 0.5  # measured spread over seeds: 8 %


@dataclass(frozen=True)
class Command:
    name: str
    args: tuple  # the command and its inputs; COMMON and the side's overrides are added
    start: str = ""  # the checkpoint it loads (both sides start from its weights)
    losses: tuple = ("train/loss",)  # the logged losses to compare, with train/grad_norm


@pytest.fixture(scope="module")
def pretrain(tokenizer_dir, corpora):
    data = f"data.train=[{corpora['stdlib-code']}]"
    return Command("pretrain", ("pretrain", "model=tiny-llama", f"tokenizer={tokenizer_dir}", data))


@pytest.fixture(scope="module")
def correct(llama_ckpt, corpora):
    data = f"data.train=[{corpora['stdlib-code']}]"
    return Command("correct", ("correct", f"load={llama_ckpt}", data), start=llama_ckpt)


@pytest.fixture(scope="module")
def distill(student, teacher, corpora):  # noqa: F811 - the imported fixtures, by name
    data = f"data.train=[{corpora['stdlib-code']}]"
    args = ("distill", f"load={student}", f"teacher={teacher}", data, "distill.chunk_tokens=48")
    return Command("distill", args, start=student, losses=("train/loss", "train/lm_loss"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(command, side)``: that run, made once per module."""
    cache = {}

    def get(command: Command, side: str):
        if (command.name, side) not in cache:
            env, extra, nproc = SIDES[side]
            save = str(tmp_path_factory.mktemp(f"{command.name}-{side}") / "out")
            args = [*command.args, *COMMON, *extra]
            cache[command.name, side] = train_run(args, save, env, nproc)
        return cache[command.name, side]

    return get


def tight(command: Command) -> dict:
    return {k: TIGHT_RTOL for k in (*command.losses, "train/grad_norm")}


@pytest.mark.parametrize("name", ["correct", "distill"])
def test_fp32_steps_on_gpu_equal_cpu(name, request, runs):
    command = request.getfixturevalue(name)
    gpu, cpu = runs(command, "gpu-fp32"), runs(command, "cpu-fp32")
    assert_rows_close(gpu.rows, cpu.rows, tight(command))
    assert_same_update(canonical_weights(command.start), gpu, cpu)


@pytest.mark.parametrize("name", ["correct", "distill"])
def test_bf16_steps_on_gpu_close_to_cpu_fp32(name, request, runs):
    command = request.getfixturevalue(name)
    gpu, cpu = runs(command, "gpu-bf16"), runs(command, "cpu-fp32")
    rtols = {k: LOOSE_LOSS_RTOL for k in command.losses}
    assert_rows_close(gpu.rows, cpu.rows, dict(rtols, **{"train/grad_norm": LOOSE_GRAD_RTOL}))
    assert_similar_update(canonical_weights(command.start), gpu, cpu)


@pytest.mark.parametrize("side", ["gpu-fp32", "gpu-bf16"])
def test_pretrain_steps_on_gpu_match_cpu(side, pretrain, runs):
    gpu, cpu = runs(pretrain, side), runs(pretrain, "cpu-fp32")
    rtols = {"train/loss": PRETRAIN_LOSS_RTOL, "train/grad_norm": PRETRAIN_GRAD_RTOL}
    assert_rows_close(gpu.rows, cpu.rows, rtols)
    assert {k: v.shape for k, v in gpu.weights.items()} == {
        k: v.shape for k, v in cpu.weights.items()
    }


@requires_gpus(2)
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_distill_on_two_gpus_equals_one_gpu(layout, distill, runs):
    one, two = runs(distill, "gpu-fp32"), runs(distill, f"gpu-fp32-{layout}")
    assert_rows_close(two.rows, one.rows, tight(distill))
    assert_same_update(canonical_weights(distill.start), two, one)
