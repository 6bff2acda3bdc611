"""Rank-aware logging: library code logs through here, never with bare ``print``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

import torch.distributed as dist

_LOGGER = logging.getLogger("minitron")


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be redirected after set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: str = "INFO") -> None:
    if _LOGGER.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[minitron %(asctime)s] %(message)s", "%H:%M:%S"))
    _LOGGER.addHandler(handler)
    _LOGGER.setLevel(level)
    _LOGGER.propagate = False


def log0(msg: str, *args) -> None:
    """Log on global rank 0 only."""
    if rank() == 0:
        setup_logging()
        _LOGGER.info(msg, *args)


def log_all(msg: str, *args) -> None:
    """Log on every rank, prefixed with the rank."""
    setup_logging()
    _LOGGER.info("[rank %d] " + msg, rank(), *args)


_ECHO = [True]


@contextlib.contextmanager
def echo_metrics(on: bool):
    """Whether :func:`emit_metrics` also prints (``minitron pipeline`` prints one summary line
    per stage instead of each command's JSON line; ``metrics.json`` is written either way)."""
    old, _ECHO[0] = _ECHO[0], on
    try:
        yield
    finally:
        _ECHO[0] = old


def emit_metrics(metrics: dict, out_dir: str | None) -> None:
    """The command-line contract: one JSON line on stdout and ``metrics.json`` in ``out_dir``."""
    if rank() != 0:
        return
    line = json.dumps(metrics, sort_keys=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, ".metrics.json.tmp")
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, os.path.join(out_dir, "metrics.json"))
    if _ECHO[0]:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# Megatron warns at import about optional accelerators that a CPU run never has; one line each per
# process and rank drowns the real output.  Only these exact, known-harmless messages are hidden.
_KNOWN_NOISE = (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r"full scope is deprecated.*",
    r"When using async grad allreduce it is recommended.*",
    r"Please use DTensor instead and we are deprecating ShardedTensor.*",
)


def quiet_known_warnings() -> None:
    import warnings

    for pattern in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def progress(iterable, desc: str, total: int | None = None, **kw):
    """A tqdm progress bar on global rank 0 (silent elsewhere and when stderr is not a TTY
    unless MINITRON_PROGRESS=1)."""
    from tqdm import tqdm

    show = rank() == 0 and (sys.stderr.isatty() or os.environ.get("MINITRON_PROGRESS") == "1")
    return tqdm(iterable, desc=desc, total=total, disable=not show, dynamic_ncols=True, **kw)
