"""The run directory's records: a done-marker per finished step (``stages/<step>.json``: the
resolved config it ran with and its metrics), the failed student variants
(``stages/failed.json``), and the training logs the report reads. Rank 0 writes them, every
rank fails together when a write fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from minitron_mcore.parallel import fail_together

MARKERS = "stages"
FAILED = "stages/failed.json"


def jsonable(obj):
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def marker_path(run_dir: str, step_id: str) -> str:
    return os.path.join(run_dir, MARKERS, f"{step_id}.json")


def read_marker(run_dir: str, step_id: str):
    path = marker_path(run_dir, step_id)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_marker(run_dir: str, step, metrics: dict, seconds: float) -> None:
    path = marker_path(run_dir, step.id)
    record = {
        "id": step.id,
        "command": step.command,
        "config": jsonable(step.config),
        "output": step.output,
        "metrics": jsonable(metrics),
        "seconds": round(seconds, 3),
    }

    def write():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    fail_together(write, rank0_only=True)  # every rank fails with rank 0, at once


def forget(run_dir: str, step) -> None:
    """Remove a step's marker and the outputs it owns (only inside the run directory)."""

    def remove():
        root = os.path.realpath(run_dir)
        for path in step.owned:
            real = os.path.realpath(path)
            if real.startswith(root + os.sep) and os.path.exists(real):
                shutil.rmtree(real) if os.path.isdir(real) else os.remove(real)
        for extra in (step.output.rstrip("/") + ".logs", step.output.rstrip("/") + ".eval"):
            if os.path.realpath(extra).startswith(root + os.sep) and os.path.isdir(extra):
                shutil.rmtree(extra)
        if os.path.exists(marker_path(run_dir, step.id)):
            os.remove(marker_path(run_dir, step.id))

    fail_together(remove, rank0_only=True)


def record_failures(run_dir: str, failed: dict) -> None:
    """``stages/failed.json`` for the report (removed once every variant succeeds)."""
    path = os.path.join(run_dir, FAILED)

    def write():
        if failed:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(failed, f, indent=2)
        elif os.path.exists(path):
            os.remove(path)

    fail_together(write, rank0_only=True)


def read_markers(run_dir: str) -> dict:
    """Every finished step's record, by step id."""
    out = {}
    d = os.path.join(run_dir, MARKERS)
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.endswith(".json"):
            with open(os.path.join(d, name)) as f:
                rec = json.load(f)
            if isinstance(rec, dict) and "id" in rec:  # (failed.json is not a step)
                out[rec["id"]] = rec
    return out


def read_failures(run_dir: str) -> dict:
    """The failed student variants and why (empty when none failed)."""
    path = os.path.join(run_dir, FAILED)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_train_log(save: str) -> list[dict]:
    """The records of a training command's ``train_log.jsonl`` (empty if it has none)."""
    path = os.path.join(save.rstrip("/") + ".logs", "train_log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
