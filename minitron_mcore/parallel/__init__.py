"""Distributed start-up (torchrun / SLURM / single process), model-parallel groups, seeding."""

from __future__ import annotations

import contextlib
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from minitron_mcore import compat
from minitron_mcore.errors import require


@dataclass
class ParallelConfig:
    """How the model is split over processes (data parallelism takes the rest)."""

    tp: int = 1
    """Tensor-parallel size (Megatron ``tensor_model_parallel_size``)."""
    pp: int = 1
    """Pipeline-parallel size (Megatron ``pipeline_model_parallel_size``)."""
    backend: str = "auto"
    """Process-group backend: ``auto`` (nccl with CUDA, gloo without), ``nccl`` or ``gloo``."""
    timeout_minutes: int = 30
    """Collective timeout."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """Translate SLURM's variables to torchrun's when started by ``srun`` without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        # "node[001-004]" -> "node001"; a plain list -> its first entry.
        head = nodes.split(",")[0]
        if "[" in head:
            base, rng = head.split("[", 1)
            head = base + rng.rstrip("]").split("-")[0]
        os.environ["MASTER_ADDR"] = head


def init_process_group(parallel: ParallelConfig) -> None:
    """Start torch.distributed from torchrun/SLURM variables, or as a 1-process group."""
    compat.activate()
    if dist.is_initialized():
        return
    _env_from_slurm()
    backend = parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    require(backend in ("nccl", "gloo"), f"parallel.backend={backend!r}: use auto, nccl or gloo")
    timeout = timedelta(minutes=parallel.timeout_minutes)
    if "RANK" not in os.environ:
        # A plain `minitron ...` run: a one-process group on a free local port.  The environment
        # is left alone so that child processes do not mistake themselves for torchrun ranks.
        init = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(backend, init_method=init, rank=0, world_size=1, timeout=timeout)
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timeout)


def world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch; then Megatron's per-TP-rank model-parallel RNG."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Process group + Megatron TP/PP/DP groups + seeds. Idempotent for the same layout."""
    from megatron.core import parallel_state as ps

    init_process_group(parallel)
    world = dist.get_world_size()
    require(
        world % (parallel.tp * parallel.pp) == 0,
        f"world size {world} is not divisible by parallel.tp*parallel.pp="
        f"{parallel.tp * parallel.pp}; launch a multiple of tp*pp processes",
    )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp
    )
    set_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def parallel_context(parallel: ParallelConfig, seed: int = 1234):
    init_parallel(parallel, seed)
    try:
        yield
    finally:
        shutdown()


def comm_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU with NCCL, CPU with gloo."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
