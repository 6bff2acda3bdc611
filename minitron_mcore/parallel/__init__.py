"""Distributed start-up (torchrun / SLURM / single process), model-parallel groups made once per
layout, seeding, and the device every model and collective uses. The launcher's environment is
:mod:`.launch_env`'s, the ranks' agreement on failures and decisions :mod:`.agreement`'s."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from minitron_mcore import compat
from minitron_mcore.errors import MinitronError, require

# The package's public names, importable from ``minitron_mcore.parallel`` as before.
from minitron_mcore.parallel.agreement import (  # noqa: F401
    barrier,
    compare_error_with_rank0,
    fail_together,
    is_rank0,
    rank0_decides,
    should_print_error,
)
from minitron_mcore.parallel.launch_env import (  # noqa: F401
    expand_hostlist,
    free_port,
    in_slurm_step,
    launcher_ranks,
    slurm_hostnames,
    slurm_master_port,
    slurm_step_tasks,
    slurm_to_torch_env,
)


@dataclass
class ParallelConfig:
    """How the model is split over processes (data parallelism takes the rest)."""

    tp: int = 1
    """Tensor-parallel size (Megatron ``tensor_model_parallel_size``)."""
    pp: int = 1
    """Pipeline-parallel size (Megatron ``pipeline_model_parallel_size``)."""
    ep: int = 1
    """Expert-parallel size of mixture-of-experts layers (Megatron
    ``expert_model_parallel_size``): each group of ``ep`` ranks splits the experts, tokens
    travel to their experts' ranks (all-to-all); a dense model ignores it."""
    backend: str = "auto"
    """Process-group backend: ``auto`` (nccl with CUDA, gloo without), ``nccl`` or ``gloo``."""
    timeout_minutes: int = 30
    """Collective timeout."""
    sequence_parallel: str = "auto"
    """Split norms, dropout and residuals of trained models over the TP ranks along the
    sequence: auto (on GPUs when tp > 1), true, false (``train/fast_paths.py``)."""


def init_process_group(parallel: ParallelConfig) -> None:
    """Start torch.distributed from torchrun/SLURM variables, or as a 1-process group."""
    compat.activate()
    if dist.is_initialized():
        return
    os.environ.update(slurm_to_torch_env(os.environ))
    backend = parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    require(backend in ("nccl", "gloo"), f"parallel.backend={backend!r}: use auto, nccl or gloo")
    require(
        backend != "nccl" or torch.cuda.is_available(),
        "parallel.backend=nccl needs CUDA GPUs and none is visible on this machine; use "
        "parallel.backend=gloo (or auto) to run on CPU, or check CUDA_VISIBLE_DEVICES",
    )
    timeout = timedelta(minutes=parallel.timeout_minutes)
    if "RANK" not in os.environ:
        # A plain `minitron ...` run: a one-process group on a free local port.  The environment
        # is left alone so that child processes do not mistake themselves for torchrun ranks.
        init = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(backend, init_method=init, rank=0, world_size=1, timeout=timeout)
        return
    if torch.cuda.is_available():
        # Modulo: with --gpus-per-task (or CUDA_VISIBLE_DEVICES per rank) every task sees only
        # its own GPU(s), so LOCAL_RANK can exceed the visible device count.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=timeout)


def world_size() -> int:
    """Processes of this run, before or after the process group exists: torchrun's WORLD_SIZE,
    else the task count of the ``srun`` job step this process belongs to, else 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return int(slurm_step_tasks(os.environ)) if in_slurm_step(os.environ) else 1


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch, then Megatron's per-TP-rank model-parallel RNG - with
    ``seed + 100 * pipeline rank``, as Megatron-LM does: every pipeline stage builds different
    layers, and with one seed for all stages the later stages would replay the first stage's
    random numbers (their initial weights repeat its values).  Data-parallel replicas keep equal
    seeds (equal initial weights).  The datasets are seeded separately with the unshifted seed.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        seed += 100 * ps.get_pipeline_model_parallel_rank()
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
    require(
        parallel.ep >= 1 and (world // parallel.pp) % (parallel.tp * parallel.ep) == 0,
        f"parallel.ep={parallel.ep}: the {world // parallel.pp} ranks of a pipeline stage are not "
        f"divisible by parallel.tp*parallel.ep={parallel.tp * parallel.ep}; launch a multiple of "
        "tp*ep*pp processes",
    )
    if not (ps.model_parallel_is_initialized() and _layout() == _wanted(parallel)):
        # Groups are made once per layout: ``minitron pipeline`` runs ~15 commands in one
        # process group, and every set of groups is a set of NCCL communicators on each GPU.
        _destroy_model_parallel_groups()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            expert_model_parallel_size=parallel.ep,
        )
    set_seed(seed)


def _wanted(parallel: ParallelConfig) -> tuple[int, int, int]:
    return parallel.tp, parallel.pp, parallel.ep


def _layout() -> tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
    )


def _destroy_model_parallel_groups() -> None:
    """Free Megatron's groups of the current layout, then forget them. Megatron's
    ``destroy_model_parallel`` only drops its references to them: the communicators (NCCL's
    GPU memory and connections) would stay for the life of the process group."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return
    groups, stack = {}, list(vars(ps).values())
    while stack:
        x = stack.pop()
        if isinstance(x, dist.ProcessGroup):
            groups[id(x)] = x
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    ps.destroy_model_parallel()  # destroys its gloo groups itself
    for g in groups.values():
        if g is dist.group.WORLD or g is dist.distributed_c10d._get_default_group():
            continue
        try:
            dist.destroy_process_group(g)
        except ValueError:  # already destroyed (Megatron's gloo groups)
            pass


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()  # the default group and every group made from it


@contextlib.contextmanager
def process_group(parallel: ParallelConfig | None):
    """The process group for one command, owned for its whole run (the CLI opens it before the
    command reads its output directory, so that rank 0 can decide what is there for every
    rank: :func:`rank0_decides`). ``None`` (a command without a ``parallel`` config): no group.
    Nested inside an existing group it does nothing."""
    owner = parallel is not None and not dist.is_initialized()
    try:
        if owner:
            init_process_group(parallel)
        yield
    except MinitronError as e:
        if owner:
            compare_error_with_rank0(e)
        raise
    finally:
        if owner:
            shutdown()


@contextlib.contextmanager
def parallel_context(parallel: ParallelConfig, seed: int = 1234):
    """Process group + model-parallel groups for one command. Re-entrant: inside an outer
    context (``minitron pipeline`` runs every stage in one process group) the groups of the
    same layout are kept (another layout replaces them), the seeds are set anew, and the
    process group is left to the outer owner."""
    with process_group(parallel):
        init_parallel(parallel, seed)
        yield


def device() -> torch.device:
    """The device of this rank's models: the current GPU (``LOCAL_RANK`` mod the visible count,
    set by :func:`init_process_group`), CPU without CUDA. Every tensor a model, a loss or an NCCL
    collective sees is put here - by :func:`to_device` at the data boundary, or made here
    with ``device=device()``."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


comm_device = device  # small tensors for collectives live where the models do (NCCL: the GPU)


def to_device(obj):
    """``obj`` (a tensor, or dicts / lists / tuples of them) on :func:`device`: the one place
    host data (micro-batches, calibration batches, teacher inputs, stored logits) crosses to the
    models' device. Tensors already there are returned as they are. Host tensors should be in
    pinned memory (``data.datasets.collate`` pins on a GPU machine) so that the copy is
    asynchronous (``non_blocking``) and overlaps the previous micro-batch's compute. (``.to``
    of a tensor already on ``dev`` returns it without a copy.)"""
    dev = device()
    if isinstance(obj, torch.Tensor):
        return obj.to(dev, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v) for v in obj)
    return obj
