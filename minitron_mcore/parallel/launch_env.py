"""The launcher's environment: which process of which run this is, under torchrun or an
``srun`` job step (SLURM's variables translated to torchrun's), and a free local port for a
one-process group."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping

from minitron_mcore.errors import require


def free_port() -> int:
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


def in_slurm_step(environ: Mapping[str, str]) -> bool:
    """Is this process a task of an ``srun`` job step (not the batch script or an salloc shell)?"""
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", ""))
    return "SLURM_PROCID" in environ and step.isdigit() and int(step) < _SLURM_MAX_NORMAL_STEP_ID


def slurm_step_tasks(environ: Mapping[str, str]) -> str:
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
    if "RANK" in environ or not in_slurm_step(environ):
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
        "WORLD_SIZE": slurm_step_tasks(environ),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": addr,
        "MASTER_PORT": environ.get("MASTER_PORT") or str(slurm_master_port(job_id)),
    }


def launcher_ranks(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(global rank, local rank) given by torchrun or an srun job step; None for one process."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ:
        return int(environ["RANK"]), int(environ.get("LOCAL_RANK", "0"))
    if in_slurm_step(environ):
        return int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", "0"))
    return None
