"""One writer per output: a lock beside each command's output, and workers that stop when their
launcher dies.

**The lock.** A command that writes ``save=DIR`` (or a pipeline's ``run_dir``) holds
``DIR.lock`` for its whole run - a file beside the output, since the output itself is made and
swapped atomically and may not exist yet. The holder keeps an exclusive ``flock`` on it (the
kernel drops it when the process dies, however it dies) and writes a record into it: host,
pid, job id (``SLURM_JOB_ID``), start time. A daemon thread touches the file every
``heartbeat`` seconds. A second run finds the ``flock`` taken and stops at once with one error
naming the holder, having changed nothing. Where ``flock`` does not reach across hosts (some
network file systems), the record decides: a holder on another host whose heartbeat is younger
than :data:`STALE_SECONDS` is alive; a holder on this host is alive while its pid is. A lock
whose holder is gone (killed: the record stays) is taken over with a warning. On release the
file is removed. ``flock`` + the inode check after it is the usual lock-file protocol; no
library in the project's dependencies offers it with a heartbeat and a readable holder, so it
is written here.

**The launcher.** torchrun and srun start their workers in sessions of their own, so a
SIGKILLed launcher leaves its workers training - and writing into the same directory as the
run that is started again. :func:`watch_launcher` notices when the process that started this
one is gone (the parent pid changes: the worker was re-parented) and sends this process
SIGTERM, which the training loop already answers with a checkpoint at the next step and a
clean exit (``PR_SET_PDEATHSIG`` would fire when the parent *thread* exits, which launchers
that spawn from a worker thread do long before they die).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time

from minitron_mcore.errors import MinitronError
from minitron_mcore.utils.log import log0

STALE_SECONDS = float(os.environ.get("MINITRON_LOCK_STALE_SECONDS", "300"))
"""A lock whose holder is on another host and whose heartbeat is older than this (seconds;
``MINITRON_LOCK_STALE_SECONDS``) is taken over."""
HEARTBEAT_SECONDS = max(0.05, min(30.0, STALE_SECONDS / 10))


def lock_path(output: str) -> str:
    return output.rstrip("/") + ".lock"


def _record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": os.environ.get("SLURM_JOB_ID", ""),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _describe(rec: dict) -> str:
    job = f", job {rec['job_id']}" if rec.get("job_id") else ""
    return f"pid {rec.get('pid')} on {rec.get('host')}{job}, started {rec.get('started')}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True  # someone else's process, or a record we cannot read: assume alive
    return True


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        rec = json.loads(raw.decode()) if raw.strip() else {}
    except ValueError:
        rec = {}
    return rec if isinstance(rec, dict) else {}


class OutputLock:
    """The lock on one output path (see the module docstring)."""

    def __init__(self, output: str):
        self.output, self.path = output, lock_path(output)
        self._fd: int | None = None
        self._made: str | None = None  # the first directory acquire() had to make
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise one error naming its holder. Where no file can be made
        beside the output (a read-only or full file system) there is no lock: the command
        cannot write its output either, and says so with its own error."""
        try:
            self._made = _make_parents(os.path.dirname(os.path.abspath(self.path)))
            fd = self._open_locked()
        except OSError:
            self._remove_made()
            return
        try:
            holder = _read(fd)
            self._refuse_if_alive(holder, os.fstat(fd).st_mtime)
            if holder:
                log0(
                    "warning: taking over the lock of %s (%s): its holder is gone",
                    self.output,
                    _describe(holder),
                )
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(_record()).encode())
            os.fsync(fd)
        except OSError:
            os.close(fd)
            return
        except BaseException:
            os.close(fd)
            self._remove_made()
            raise
        self._fd = fd
        self._beat = threading.Thread(target=self._heartbeat, name="minitron-lock", daemon=True)
        self._beat.start()

    def _open_locked(self) -> int:
        """An fd of the lock file holding its flock; the file at ``path`` is that fd's (a
        holder that released - unlinked - between our open and our flock leaves us holding a
        file nobody else sees: then try again)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                deadline = time.monotonic() + 2.0
                while not holder and time.monotonic() < deadline:  # taken, not written yet
                    time.sleep(0.02)
                    holder = _read(fd)
                os.close(fd)
                raise MinitronError(self._held(holder)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _refuse_if_alive(self, holder: dict, beat: float) -> None:
        """We hold the flock; still refuse a holder that may be alive where flock does not
        reach (another host with a fresh heartbeat, or a live pid on this host)."""
        if not holder or holder.get("pid") == os.getpid():
            return
        fresh = time.time() - beat < STALE_SECONDS
        here = holder.get("host") == socket.gethostname()
        if fresh and (not here or _pid_alive(holder.get("pid"))):
            raise MinitronError(self._held(holder))

    def _held(self, holder: dict) -> str:
        who = _describe(holder) if holder else "another process"
        return (
            f"{self.output} is being written by another run ({who}); wait for it to end or "
            f"stop it, or choose another output (the lock is {self.path})"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        """Remove the directories acquire() made if they stayed empty (a refused or failed
        command leaves nothing behind)."""
        if self._made is None:
            return
        d = os.path.dirname(os.path.abspath(self.path))
        while True:
            try:
                os.rmdir(d)
            except OSError:
                break
            if d == self._made:
                break
            d = os.path.dirname(d)
        self._made = None


def _make_parents(parent: str) -> str | None:
    """``os.makedirs(parent)``; returns the first directory it had to make (None: none)."""
    first, d = None, parent
    while not os.path.isdir(d):
        first, d = d, os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    return first


# ----------------------------------------------------------------------------- the launcher


def _pid1_is_a_launcher() -> bool:
    """Is PID 1 itself a launcher (torchrun as a container's entry point, srun's stepd)?"""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return True  # cannot tell: assume the parent is the launcher
    return any(k in cmd for k in (b"torch", b"srun", b"slurmstepd", b"minitron"))


def watch_launcher(interval: float = 1.0) -> threading.Thread:
    """Stop this process once the process that started it is gone (a daemon thread polling the
    parent pid). For workers started by a launcher (torchrun, an srun job step:
    ``parallel.launcher_ranks``); a plain ``minitron`` run belongs to the user's shell.

    Once the process group is up: SIGTERM, i.e. a checkpoint at the next step and exit 0.
    Before it (the worker was still starting, or waits at the rendezvous whose store torchrun
    hosts - until the collective timeout): nothing has run yet, so it exits at once. A launcher
    gone before this is called shows as a parent pid of 1 that is not a launcher itself."""
    parent = os.getppid()
    gone_already = parent == 1 and not _pid1_is_a_launcher()

    def watch():
        while not gone_already and os.getppid() == parent:
            time.sleep(interval)
        import torch.distributed as dist

        if not dist.is_initialized():
            log0("the launcher (pid %d) is gone before the run started: exiting", parent)
            os._exit(1)  # the main thread may be blocked in the rendezvous
        log0("the launcher (pid %d) is gone: stopping as on SIGTERM", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="minitron-launcher-watch", daemon=True)
    thread.start()
    return thread
