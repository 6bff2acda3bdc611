"""Putting a written checkpoint version in place: the atomic directory swap, the tracker replaced
in one rename, old versions collected, and the recovery of what a killed save had completed.
Each step leaves a loadable checkpoint behind (the layout: :mod:`.megatron`)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

from minitron_mcore.checkpoint.layout import (
    META_FILE,
    VERSION_RE,
    CheckpointMeta,
    current_version,
    newest_training_version,
    read_json_meta,
)
from minitron_mcore.utils.faults import fault_point
from minitron_mcore.utils.log import log0


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem cannot (then the caller falls back to two renames)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    ok = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    return ok


def atomic_swap(tmp: str, path: str) -> None:
    """Put the complete directory ``tmp`` at ``path``, replacing what is there.

    With an existing ``path`` the two are exchanged in one atomic step where the filesystem
    supports it (Linux local filesystems), so ``path`` is never missing; elsewhere the old
    directory is renamed to ``path.old-<time>`` first and removed after."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        fault_point("swap:exchanged")
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old contents
        return
    old = f"{path}.old-{int(time.time())}"
    os.rename(path, old)
    fault_point("swap:old-moved")
    os.rename(tmp, path)
    fault_point("swap:new-in-place")
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: str, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fault_point("tracker:written")
    os.replace(tmp, path)
    fault_point("tracker:replaced")
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _complete_home(home: str) -> bool:
    """A checkpoint directory whose tracker names a version that is fully present."""
    version = current_version(home) if os.path.isdir(home) else None
    return bool(version) and os.path.isfile(os.path.join(home, version, META_FILE))


def _make_current(d: str, version: str) -> None:
    meta = dataclasses.replace(read_json_meta(os.path.join(d, version)), version=version)
    _write_json(os.path.join(d, META_FILE), meta.to_json())


def recover_home(home: str) -> None:
    """Finish what a save that was killed had completed (writer start-up, and a re-run that
    finds its run finished).

    * ``home`` missing and ``home.partial`` holding a complete version (killed while building a
      new checkpoint directory beside its target, after the version was in it): name the newest
      training version if the staged tracker was not written yet, and rename it into place;
    * the tracker behind the newest complete training version (killed between renaming a
      version into place and replacing the tracker): name that version."""
    staged = home + ".partial"
    if not os.path.exists(home) and os.path.isdir(staged):
        newest = newest_training_version(staged)
        if newest and not _complete_home(staged):
            _make_current(staged, newest[1])
        if _complete_home(staged):
            os.rename(staged, home)
            log0("recovered %s from an interrupted save", home)
    if not os.path.isdir(home):
        return
    cur = current_version(home)
    if cur is None:
        return  # not a checkpoint directory, or an old flat checkpoint: nothing to recover
    newest = newest_training_version(home)
    m = VERSION_RE.match(cur)
    cur_it = int(m.group(2)) if m and m.group(2) else -1
    if newest and newest[0] > cur_it:
        _make_current(home, newest[1])
        log0("recovered %s: its newest complete version %s is now current", home, newest[1])


def collect_garbage(home: str, keep: int) -> None:
    """Delete versions beyond the ``keep`` newest training versions (the current one is always
    kept), other versions that are not current, and partial writes."""
    cur = current_version(home)
    entries = sorted(os.listdir(home))
    iters = sorted(
        ((int(m.group(2)), d) for d in entries if (m := VERSION_RE.match(d)) and m.group(2)),
        reverse=True,
    )
    cur_it = next((it for it, d in iters if d == cur), None)
    kept = {cur}
    if cur_it is not None:
        kept |= set([d for it, d in iters if it < cur_it][: max(keep - 1, 0)])
    for d in entries:
        if (VERSION_RE.match(d) and d not in kept) or d.endswith(".partial"):
            shutil.rmtree(os.path.join(home, d), ignore_errors=True)
            fault_point("gc:removed")


def commit_version(tmp: str, home: str, tag: str, meta: CheckpointMeta, keep: int) -> None:
    """Rank 0, after every rank's files are in ``tmp``: make ``tmp`` version ``tag`` of
    ``home`` and the current one. Each step leaves a loadable checkpoint behind."""
    tracker = dataclasses.replace(meta, version=tag).to_json()
    if current_version(home) is None:
        # A new checkpoint directory (or a non-checkpoint one being overwritten): build it
        # whole beside the target and put it in place in one step.
        staged = home.rstrip("/") + ".partial"
        shutil.rmtree(staged, ignore_errors=True)
        os.makedirs(staged)
        os.rename(tmp, os.path.join(staged, tag))
        _write_json(os.path.join(staged, META_FILE), tracker)
        fault_point("save:staged")
        atomic_swap(staged, home)
        fault_point("save:home-in-place")
        return
    dest = os.path.join(home, tag)
    if os.path.exists(dest):  # left by a save that died before its tracker update
        shutil.rmtree(dest)
        fault_point("save:stale-removed")
    os.rename(tmp, dest)
    fault_point("save:version-in-place")
    _write_json(os.path.join(home, META_FILE), tracker)
    collect_garbage(home, keep)
