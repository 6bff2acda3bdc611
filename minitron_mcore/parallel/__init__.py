"""Distributed start-up (torchrun / SLURM / single process), model-parallel groups, seeding."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from minitron_mcore import compat
from minitron_mcore.errors import MinitronError, require, storage_error


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
    sequence_parallel: str = "auto"
    """Split norms, dropout and residuals of trained models over the TP ranks along the
    sequence: auto (on GPUs when tp > 1), true, false (``train/fast_paths.py``)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- SLURM
#
# `srun` starts every task of a *job step* itself, so minitron can run without torchrun: the
# SLURM variables are translated to torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
# MASTER_PORT).  Only a task of a regular job step counts as a rank.  SLURM_PROCID alone is not
# enough: the batch script itself runs as process 0 of the batch step (SLURM_PROCID=0 and
# SLURM_NTASKS=<the job's task count>), and an `salloc` shell exports SLURM_NTASKS (with
# LaunchParameters=use_interactive_step also SLURM_PROCID=0) - a plain `minitron ...` typed there
# is one process.  srun sets SLURM_STEP_ID to the step's number (0, 1, ...); the batch, extern
# and interactive steps have reserved ids >= 0xFFFFFFF0 (SLURM_MAX_NORMAL_STEP_ID), which
# slurmstepd exports formatted as signed numbers (the batch script sees SLURM_STEP_ID=-5).  So:
# a rank is a process with SLURM_PROCID and a normal SLURM_STEP_ID (SLURM_STEPID in old
# releases); the process-count and rank rules below all follow from this one test.

_SLURM_MAX_NORMAL_STEP_ID = 0xFFFFFFF0


def _in_slurm_step(environ: Mapping[str, str]) -> bool:
    """Is this process a task of an ``srun`` job step (not the batch script or an salloc shell)?"""
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", ""))
    return "SLURM_PROCID" in environ and step.isdigit() and int(step) < _SLURM_MAX_NORMAL_STEP_ID


def _slurm_step_tasks(environ: Mapping[str, str]) -> str:
    # SLURM_STEP_NUM_TASKS is the step's own count (srun -n 2 inside a 16-task job; srun
    # --preserve-env keeps the allocation's SLURM_NTASKS).
    return environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1"


def slurm_master_port(job_id: str) -> int:
    """Rendezvous port of a SLURM job: 10000 + job id mod 20000, so two jobs sharing a node use
    different ports (unless their ids differ by a multiple of 20000), and the range 10000-29999
    stays below Linux's ephemeral ports (32768+) that outgoing connections take.
    ``launch/slurm.sbatch`` and ``launch/torchrun.sh`` compute the same number."""
    return 10000 + int(job_id) % 20000 if job_id.isdigit() else 29500


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``gpu-a[01-02],gpu-b07``, ``node[1,3,5-7]``,
    ``rack1-node[08-10]-ib``, ``r[1-2]-n[1-2]``) into host names, in SLURM's order.  Used when
    ``scontrol`` is not installed."""
    hosts: list[str] = []
    for item in _split_hostlist(nodelist):
        hosts += _expand_host(item, nodelist)
    require(bool(hosts), f"SLURM node list {nodelist!r} is empty; set MASTER_ADDR")
    return hosts


def _split_hostlist(nodelist: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, current = [], 0, ""
    for ch in nodelist:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        require(0 <= depth <= 1, f"cannot parse SLURM node list {nodelist!r}; set MASTER_ADDR")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    require(depth == 0, f"cannot parse SLURM node list {nodelist!r}; set MASTER_ADDR")
    return [i.strip() for i in items + [current] if i.strip()]


def _expand_host(item: str, nodelist: str) -> list[str]:
    """``prefix[ranges]rest`` -> names; ``rest`` may hold further bracket groups."""
    m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", item)
    if m is None:
        require(
            "[" not in item and "]" not in item,
            f"cannot parse SLURM node list {nodelist!r}; set MASTER_ADDR",
        )
        return [item]
    prefix, ranges, rest = m.groups()
    tails = _expand_host(rest, nodelist)
    names = []
    for part in ranges.split(","):
        lo, dash, hi = part.strip().partition("-")
        require(
            lo.isdigit() and (not dash or (hi.isdigit() and int(hi) >= int(lo))),
            f"cannot parse {part!r} in SLURM node list {nodelist!r}; set MASTER_ADDR",
        )
        width = len(lo)  # zero padding comes from the lower bound: [08-10] -> 08 09 10
        for n in range(int(lo), int(hi if dash else lo) + 1):
            names += [f"{prefix}{n:0{width}d}{tail}" for tail in tails]
    return names


def slurm_hostnames(nodelist: str) -> list[str]:
    """Host names of a node list: ``scontrol show hostnames`` when installed (SLURM's own
    parser), :func:`expand_hostlist` otherwise or if scontrol fails."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_hostlist(nodelist)


def slurm_to_torch_env(
    environ: Mapping[str, str], hostnames_fn: Callable[[str], list[str]] | None = None
) -> dict[str, str]:
    """torchrun's variables for a task started by ``srun`` without torchrun; ``{}`` (change
    nothing) when torchrun already set RANK or this process is not a task of a job step.

    MASTER_ADDR / MASTER_PORT are kept when exported (``launch/slurm.sbatch`` does); otherwise
    the first host of the step's node list (via ``hostnames_fn``, default
    :func:`slurm_hostnames`) and :func:`slurm_master_port` of the job id.  Pure: reads
    ``environ``, writes nothing.
    """
    if "RANK" in environ or not _in_slurm_step(environ):
        return {}
    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodelist = (
            environ.get("SLURM_STEP_NODELIST")
            or environ.get("SLURM_JOB_NODELIST")
            or environ.get("SLURM_NODELIST")
        )
        addr = (hostnames_fn or slurm_hostnames)(nodelist)[0] if nodelist else "127.0.0.1"
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or ""
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": _slurm_step_tasks(environ),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": addr,
        "MASTER_PORT": environ.get("MASTER_PORT") or str(slurm_master_port(job_id)),
    }


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
        init = f"tcp://127.0.0.1:{_free_port()}"
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
    return int(_slurm_step_tasks(os.environ)) if _in_slurm_step(os.environ) else 1


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
    if not (ps.model_parallel_is_initialized() and _layout() == (parallel.tp, parallel.pp)):
        # Groups are made once per layout: ``minitron pipeline`` runs ~15 commands in one
        # process group, and every set of groups is a set of NCCL communicators on each GPU.
        _destroy_model_parallel_groups()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp
        )
    set_seed(seed)


def _layout() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
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
            _compare_error_with_rank0(e)
        raise
    finally:
        if owner:
            shutdown()


def rank0_decides(fn: Callable[[], object]):
    """``fn()`` run on rank 0 alone and its result given to every rank (its error raised on
    every rank, as :func:`fail_together` does). For the decisions a command reads from the
    file system at start-up (what to resume from, whether the output is already complete):
    ranks that list a directory each on their own can see it at different moments."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box: list = [None]

    def run():
        box[0] = fn()

    fail_together(run, rank0_only=True)
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def parallel_context(parallel: ParallelConfig, seed: int = 1234):
    """Process group + model-parallel groups for one command. Re-entrant: inside an outer
    context (``minitron pipeline`` runs every stage in one process group) the groups of the
    same layout are kept (another layout replaces them), the seeds are set anew, and the
    process group is left to the outer owner."""
    with process_group(parallel):
        init_parallel(parallel, seed)
        yield


# ------------------------------------------------------------------- one message per error
#
# Under torchrun / srun every rank runs the CLI, and an input error is usually raised by all of
# them alike; the CLI prints it once (should_print_error).  The rule never hides the only copy
# of a message:
# * rank 0 always prints;
# * an error raised inside parallel_context (the ranks may have diverged: pipeline stages, data
#   shards): before the group is torn down, rank 0 posts its message in the process group's
#   key-value store and ranks > 0 wait up to _RANK0_ERROR_WAIT seconds for it.  Same message:
#   silent.  Different, or none (rank 0 is fine and busy elsewhere), or no store: print it;
# * an error raised outside it (config, input checks on files, before the process group): all
#   ranks run the same code on the same argv, so on rank 0's node rank 0 speaks for all; the
#   first rank of every other node prints too, since its files may differ (a node-local disk).
#   An identical input error is printed once per node.

_RANK0_ERROR_KEY = "minitron/error/rank0"
_RANK0_ERROR_WAIT = 5.0


def _compare_error_with_rank0(exc: MinitronError) -> None:
    """Record on ``exc`` whether rank 0 raised the same error (``minitron_rank0_same``)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        if dist.get_rank() == 0:
            store.set(_RANK0_ERROR_KEY, str(exc))
            return
        # Poll with check(): a timed-out store.wait() logs a c10d socket warning on stderr.
        deadline = time.monotonic() + _RANK0_ERROR_WAIT
        while not store.check([_RANK0_ERROR_KEY]) and time.monotonic() < deadline:
            time.sleep(0.05)
        posted = store.check([_RANK0_ERROR_KEY])
        exc.minitron_rank0_same = posted and store.get(_RANK0_ERROR_KEY).decode() == str(exc)
    except Exception:  # no answer from rank 0 (or the store): this rank prints its own error
        exc.minitron_rank0_same = False


def launcher_ranks(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(global rank, local rank) given by torchrun or an srun job step; None for one process."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ:
        return int(environ["RANK"]), int(environ.get("LOCAL_RANK", "0"))
    if _in_slurm_step(environ):
        return int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", "0"))
    return None


def should_print_error(exc: BaseException, environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process prints ``exc`` (see the rule above)."""
    ranks = launcher_ranks(environ)
    if ranks is None or ranks[0] == 0:
        return True
    rank0_same = getattr(exc, "minitron_rank0_same", None)
    if rank0_same is not None:
        return not rank0_same
    return ranks[1] == 0


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


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _failure(e: BaseException) -> tuple[bool, str]:
    """(a user error?, its one-line text)."""
    if isinstance(e, MinitronError):
        return True, str(e)
    if isinstance(e, OSError):
        try:
            return True, str(storage_error(e))
        except OSError:
            pass
    return False, f"{type(e).__name__}: {e}"


def fail_together(fn: Callable[[], None], rank0_only: bool = False) -> None:
    """Run ``fn`` on every rank (``rank0_only``: on rank 0 alone) and agree on the outcome.

    Without this, a rank whose ``fn`` fails (a full disk under rank 0's sidecar, an unwritable
    file of one rank's training state) raises while the other ranks wait at the next collective
    until the process-group timeout - 30 minutes of a job doing nothing. Here every rank learns
    of the failure at once and raises it: a user error (or a full disk, a read-only path) as the
    same :class:`MinitronError` on every rank, so it is printed once; any other exception keeps
    its traceback on the rank where it happened. Also a barrier: nobody continues before every
    rank's ``fn`` is done (with ``rank0_only``: before rank 0's is)."""
    err = None
    if not rank0_only or is_rank0():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
            err = e
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if err is not None:
            raise err
        return
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if err is None else _failure(err))
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    if err is not None and not _failure(err)[0]:
        raise err  # a bug: its traceback, on the rank where it happened
    rank, (user, text) = failed[0]
    message = text if user else f"rank {rank} failed ({text}); see its traceback"
    raise MinitronError(message) from err
