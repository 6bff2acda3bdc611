"""Checks that a run makes before its first step, for what it will need much later: an
optional package, a writable output, disk space for its first checkpoint. A pipeline that
fails on them after hours of correction and pruning wastes the hours; here it fails in
seconds, with one line that names the fix."""

from __future__ import annotations

import importlib.util
import os
import shutil

from minitron_mcore.errors import require


def require_lm_eval(tasks: list, key: str) -> None:
    """``tasks`` need lm-evaluation-harness (an optional dependency)."""
    require(
        not tasks or importlib.util.find_spec("lm_eval") is not None,
        f"{key}={list(tasks)} needs lm-evaluation-harness, which is not installed: "
        f"pip install -e '.[eval]' (or set {key}=[])",
    )


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor (where it will be created)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def require_writable(path: str, key: str) -> None:
    base = _existing(path)
    require(
        os.access(base, os.W_OK),
        f"{key}={path}: {base} is not writable; choose a directory you can write to",
    )


def require_free_disk(path: str, need_bytes: float, what: str, key: str) -> None:
    """The file system that will hold ``path`` has ``need_bytes`` free for ``what``."""
    free = shutil.disk_usage(_existing(path)).free
    require(
        free >= need_bytes,
        f"{key}={path}: {what} needs about {need_bytes / 2**30:.1f} GiB and the file system "
        f"has {free / 2**30:.1f} GiB free; free some space or choose another {key}",
    )


def checkpoint_bytes(num_params: int, training: bool, dtype_bytes: int = 4) -> float:
    """About what one checkpoint takes: the weights, plus for a training run Adam's fp32 main
    weights and two moments (12 bytes a parameter)."""
    return num_params * (dtype_bytes + (12 if training else 0))
