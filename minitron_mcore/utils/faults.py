"""Fault injection for tests: die (SIGKILL) at a chosen point of a multi-step file operation.

Library code marks the boundaries between the file operations that must be safe against a crash
with ``fault_point("name")``. With no environment variable set this is a no-op. Tests set

* ``MINITRON_FAULT_AT=N`` - the process kills itself with SIGKILL on reaching its N-th fault
  point (counted from 1, every point counts), exactly as a node failure or the OOM killer would:
  no ``finally`` block, no atexit handler runs;
* ``MINITRON_FAULT_LOG=FILE`` - every point reached is appended to FILE (``rank name``), so a
  test can enumerate the points of an operation and then kill at each one in turn;
* ``MINITRON_FAULT_RANK=R`` - only global rank R counts and dies (default: every rank);
* ``MINITRON_FAULT_ENOSPC=NAME`` - the fault point called NAME raises ``OSError(ENOSPC)``, as a
  write to a full disk does at that point of the operation (counts nothing, kills nothing).
"""

from __future__ import annotations

import errno
import os
import signal

_COUNT = 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fault_point(name: str) -> None:
    global _COUNT
    at, log = os.environ.get("MINITRON_FAULT_AT"), os.environ.get("MINITRON_FAULT_LOG")
    full = os.environ.get("MINITRON_FAULT_ENOSPC")
    if not at and not log and not full:
        return
    only = os.environ.get("MINITRON_FAULT_RANK")
    if only is not None and int(only) != _rank():
        return
    if full == name:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (simulated)")
    if not at and not log:
        return
    _COUNT += 1
    if log:
        with open(log, "a") as f:
            f.write(f"{_rank()} {_COUNT} {name}\n")
            f.flush()
            os.fsync(f.fileno())
    if at and _COUNT == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
