"""Re-running a command whose output is already complete is a no-op.

``import-hf``, ``prune``, ``importance`` and ``export-hf`` each write one output, and put it in
place atomically. A job killed after that moment (while it wrote ``metrics.json`` or shut down)
and restarted by its scheduler must finish, not fail on "already exists". So each of them
records, inside its output and before it is put in place, a *fingerprint* of what made it:

* the command and its options (those that change the result: not ``overwrite``, not the
  collective timeout or the process-group backend, not the data cache directory);
* the identity of each input: a minitron checkpoint by its ``checkpoint_id`` (new with every
  save), anything else by the path, size and modification time of its files (a changed Hugging
  Face download, scores directory or corpus gives another fingerprint; nothing is hashed, so a
  16 GB model costs a ``stat`` per file).

A re-run that finds ``save=`` holding a complete output with the same fingerprint reports that
and exits 0; anything else in ``save=`` is refused as before (``overwrite=true`` replaces it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable

from minitron_mcore.errors import MinitronError, require
from minitron_mcore.utils.log import log0

# Options that never change what a command writes.
_NOT_RESULT = {"overwrite", "save", "backend", "timeout_minutes", "cache_dir", "preprocess_workers"}


def _files(path: str) -> list:
    """[name, size, mtime] of ``path``, of each file of a directory, or of a token prefix's
    .bin/.idx."""
    from minitron_mcore.data.datasets import is_token_prefix

    if os.path.isdir(path):
        names = [n for n in sorted(os.listdir(path)) if n[0] != "."]
        return [os.path.basename(path), [_files(os.path.join(path, n)) for n in names]]
    if is_token_prefix(path):
        return [_files(path + ".bin"), _files(path + ".idx")]
    try:
        st = os.stat(path)
    except OSError:
        return [os.path.basename(path), None]
    return [os.path.basename(path), st.st_size, st.st_mtime_ns]


def input_identity(value: str):
    """What distinguishes the input named ``value`` from any other (see the module doc)."""
    from minitron_mcore.checkpoint.megatron import META_FILE, read_meta
    from minitron_mcore.data.datasets import is_token_prefix

    if not isinstance(value, str) or not value:
        return value  # a blend weight or an empty option
    path = os.path.abspath(os.path.expanduser(value))
    if os.path.isfile(os.path.join(path, META_FILE)):
        try:
            return {"path": path, "checkpoint_id": read_meta(path).checkpoint_id}
        except MinitronError:
            return {"path": path, "unreadable": True}
    if os.path.exists(path) or is_token_prefix(path):
        return {"path": path, "files": _files(path)}
    return value  # demo:<name>, or a path that does not exist (yet)


def _options(x):
    if isinstance(x, dict):
        return {k: _options(v) for k, v in x.items() if k not in _NOT_RESULT}
    if isinstance(x, (list, tuple)):
        return [_options(v) for v in x]
    return x


def fingerprint(command: str, cfg, inputs: dict) -> str:
    """A digest of ``command``, the result-relevant options of ``cfg`` (a dataclass) and the
    identities of ``inputs`` (name -> path or list of paths; those names are left out of the
    options, where they would be path strings that differ with the working directory)."""
    opts = _options({k: v for k, v in dataclasses.asdict(cfg).items() if k not in inputs})
    ids = {
        k: [input_identity(p) for p in v] if isinstance(v, (list, tuple)) else input_identity(v)
        for k, v in inputs.items()
    }
    text = json.dumps({"command": command, "options": opts, "inputs": ids}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def already_done(
    command: str,
    save: str,
    overwrite: bool,
    fp: str,
    recorded: Callable[[str], str | None],
    every_rank: bool = True,
) -> dict | None:
    """``None``: go on (``save`` is free, or ``overwrite`` is set). A dict: ``save`` already
    holds this very output - the metrics to report. Anything else in ``save``: refused.
    ``recorded(save)`` returns the fingerprint stored in a complete output, or ``None``.
    Decided on rank 0 for every rank (``parallel.rank0_decides``, a collective); with
    ``every_rank=False`` by the calling process alone, for work that one rank does while the
    others wait (the pipeline's export)."""
    from minitron_mcore.parallel import rank0_decides

    require(bool(save), f"save= is empty; pass an output directory for {command}")
    decide = lambda: _done(command, save, overwrite, fp, recorded)  # noqa: E731
    return rank0_decides(decide) if every_rank else decide()


def _done(command: str, save: str, overwrite: bool, fp: str, recorded) -> dict | None:
    if overwrite or not os.path.exists(save):
        return None
    try:
        same = recorded(save) == fp
    except (MinitronError, OSError, ValueError, KeyError, TypeError):
        same = False
    require(
        same,
        f"save={save} already exists (not the output of this command with these inputs); "
        "choose a new directory or pass overwrite=true",
    )
    log0("%s: %s is already complete (same command, same inputs); nothing to do", command, save)
    metrics = {"command": command, "save": save}
    try:
        with open(os.path.join(save, "metrics.json")) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        pass  # killed before it was written: report the minimal metrics
    return dict(metrics, skipped="already complete")


def checkpoint_fingerprint(save: str) -> str | None:
    """The fingerprint a checkpoint's last provenance entry records."""
    from minitron_mcore.checkpoint.megatron import read_meta

    prov = read_meta(save).provenance
    return prov[-1].get("fingerprint") if prov else None
