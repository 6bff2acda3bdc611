"""Work that global rank 0 does alone (tokenizing a corpus into the cache, writing a demo
corpus) while the other ranks wait for it on the filesystem, not in a collective that would
time out first (:func:`rank0_builds`)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from minitron_mcore.errors import MinitronError
from minitron_mcore.utils.log import log_all

# Waiting for rank 0 without a collective (see rank0_builds). Module constants so that tests
# can shorten them.
_POLL_SECONDS = 2.0
"""How often the waiting ranks read rank 0's status file."""
_HEARTBEAT_SECONDS = 10.0
"""How often rank 0 rewrites its status file while it works."""
_STALL_SECONDS = 600.0
"""A waiting rank gives up when rank 0's status file has not changed for this long (rank 0
was killed, or data.cache_dir is not shared between the nodes)."""
_WAIT_LOG_SECONDS = 120.0
"""How often a waiting rank logs that it is still waiting."""


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _run_token() -> str:
    """A name shared by all ranks and unique to this call (rank 0 draws it): a status file of
    an earlier run can never be mistaken for this one's."""
    from minitron_mcore.parallel import comm_device

    value = int.from_bytes(os.urandom(6), "little") if dist.get_rank() == 0 else 0
    t = torch.tensor([value], dtype=torch.int64, device=comm_device())
    dist.broadcast(t, src=0)
    return f"{int(t.item()):012x}"


class _Heartbeat:
    """Rank 0's status file: ``running <beat> <progress>`` rewritten every few seconds by a
    thread, then ``done`` or ``error <message>``."""

    def __init__(self, path: str):
        self.path, self.status, self.beat = path, "starting", 0
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.beat += 1
        try:
            _write_atomic(self.path, f"running {self.beat} {self.status}")
        except OSError:
            pass  # a full or flaky disk must not kill the work; the waiters see a stall

    def _loop(self) -> None:
        while not self._stop.wait(_HEARTBEAT_SECONDS):
            self._write()

    def finish(self, final: str) -> None:
        self._stop.set()
        self._thread.join()
        _write_atomic(self.path, final)


def _wait_for_rank0(path: str, what: str) -> None:
    """Poll rank 0's status file until it says done; raise if it failed or went silent."""
    start = last_change = last_log = time.monotonic()
    seen = None
    talk = dist.get_rank() == 1 or os.environ.get("LOCAL_RANK") == "0"  # one line per node
    while True:
        status = _read(path)
        if status == "done":
            return
        if status is not None and status.startswith("error"):
            raise MinitronError(f"rank 0 failed while preparing {what}: {status[6:]}")
        now = time.monotonic()
        if status != seen:
            seen, last_change = status, now
        if now - last_change > _STALL_SECONDS:
            raise MinitronError(
                f"rank 0 stopped reporting progress on {what} (no change to {path} for "
                f"{_STALL_SECONDS:.0f} s): it died, or data.cache_dir is not on a filesystem "
                "every node sees; fix that and re-run"
            )
        if talk and now - last_log >= _WAIT_LOG_SECONDS:
            done = seen.split(" ", 2)[2] if seen and seen.startswith("running") else "not started"
            log_all("waiting %.0f s for rank 0 to prepare %s (%s)", now - start, what, done)
            last_log = now
        time.sleep(_POLL_SECONDS)


def rank0_builds(what: str, build: Callable[[Callable[[str], None]], None], sync_dir: str):
    """Run ``build(report)`` on global rank 0 while the other ranks wait for it to finish.

    Tokenizing a multi-GB file takes longer than the process group's collective timeout
    (``parallel.timeout_minutes``), so the waiting ranks must not sit in ``dist.barrier``:
    they poll a status file in ``sync_dir`` (on a filesystem every node sees) that rank 0
    keeps rewriting (``report(text)`` sets the progress shown to them), until it reads ``done``
    - then one barrier, which everyone reaches within a poll interval. If ``build`` raises,
    rank 0 writes the error and the waiters raise it too; if rank 0 dies without a word, its
    status stops changing and the waiters give up after ``_STALL_SECONDS``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        build(lambda text: None)
        return
    from minitron_mcore.parallel import barrier

    status_dir = os.path.join(sync_dir, ".sync")
    path = os.path.join(status_dir, _run_token() + ".status")
    if dist.get_rank() == 0:
        os.makedirs(status_dir, exist_ok=True)
        beat = _Heartbeat(path)
        try:
            build(lambda text: setattr(beat, "status", text))
        except BaseException as e:
            msg = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
            beat.finish(f"error {msg}")
            raise
        beat.finish("done")
    else:
        _wait_for_rank0(path, what)
    barrier()
    if dist.get_rank() == 0:
        os.remove(path)  # everyone has read it
