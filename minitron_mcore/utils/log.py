"""Rank-aware logging: library code logs through here, never with bare ``print``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time

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


_PROGRESS_INTERVAL = 60.0  # seconds between progress lines off a terminal


def progress_interval() -> float:
    """``MINITRON_PROGRESS_INTERVAL`` (seconds, default 60; 0 = a line per item). A bad value
    falls back to the default with a warning rather than failing rank 0 alone mid-run."""
    raw = os.environ.get("MINITRON_PROGRESS_INTERVAL", "").strip()
    if not raw:
        return _PROGRESS_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value >= 0:
        return value
    log0("MINITRON_PROGRESS_INTERVAL=%r is not seconds >= 0; using %g", raw, _PROGRESS_INTERVAL)
    return _PROGRESS_INTERVAL


class LogProgress:
    """Progress as log lines, for output that is not a terminal (torchrun, SLURM, ``| tee``),
    where a tqdm bar is invisible or floods the file with carriage returns.

    The subset of tqdm's interface the loops use: iterate it, or ``update(n)`` then
    ``close()``; ``set_postfix_str`` adds text to the lines but the last. A line comes after
    the first item (the user sees the loop started and its speed), then whenever ``interval``
    seconds have passed since the last line, and at the end with the total time. Rate and ETA
    are averages since the start: with lines a minute apart, a recent rate would be one noisy
    sample."""

    disable = False  # tqdm's flag, for callers that check whether progress is shown

    def __init__(
        self, iterable, desc: str, total=None, interval=_PROGRESS_INTERVAL, unit="it", clock=None
    ):
        self.iterable, self.desc, self.total = iterable, desc, total
        self.unit, self.interval = unit, interval
        self.clock = clock or time.monotonic  # injectable for tests
        self.n, self.postfix, self.closed, self.last = 0, "", False, None
        self.start = self.clock()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)  # the caller's work on ``item`` is done when it asks for the next
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if self.last is None or now - self.last >= self.interval:
            self.last = now
            log0(self.line(now - self.start))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self.closed and self.n:
            log0(self.line(self.clock() - self.start, done=True))
        self.closed = True

    def line(self, elapsed: float, done: bool = False) -> str:
        """``calibration: 12/51 (24%), 3.10s/it, ETA 02:00`` (tqdm's own formatting); without
        a total: count, rate and elapsed time."""
        from tqdm import tqdm

        total = self.total if self.total and self.n <= self.total else None
        count = "{n_fmt}/{total_fmt} ({percentage:.0f}%)" if total else "{n_fmt} {unit}"
        tail = "total {elapsed}" if done else "ETA {remaining}" if total else "elapsed {elapsed}"
        text = tqdm.format_meter(
            self.n,
            total,
            elapsed,
            prefix=self.desc,
            unit=self.unit,
            postfix="" if done else self.postfix,  # it may be stale by then: the caller sums up
            bar_format="{desc}: " + count + ", {rate_fmt}{postfix}, " + tail,
        )
        return " ".join(text.split())  # tqdm pads the rate to a fixed width


def progress(iterable, desc: str, total: int | None = None, **kw):
    """Progress of a long loop on global rank 0; silent on the other ranks.

    On a terminal (or with ``MINITRON_PROGRESS=1``) a tqdm bar; otherwise a :class:`LogProgress`
    that logs a line with the ETA at the first item, every ``MINITRON_PROGRESS_INTERVAL``
    seconds (default 60) and at the end, so a run under torchrun or SLURM is never silent for
    long. ``MINITRON_PROGRESS=0`` turns both off. ``total`` defaults to ``len(iterable)``;
    a generator has none, so pass it (without it the lines show count and rate, no ETA)."""
    from tqdm import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    mode = os.environ.get("MINITRON_PROGRESS", "")
    if rank() != 0 or mode == "0":
        return tqdm(iterable, total=total, disable=True)
    if mode == "1" or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, **kw)
    return LogProgress(iterable, desc, total, progress_interval(), unit=kw.get("unit", "it"))
