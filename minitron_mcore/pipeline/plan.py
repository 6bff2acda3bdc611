"""The pipeline as a list of steps: each one a single command's config, its output, and the
command's own function. Pure (no I/O): :func:`plan` turns a ``PipelineConfig`` into steps, so a
dry run, the runner and the report all see the same commands.

Layout of the run directory::

    tokenizer/                  the default run's tokenizer (BPE trained on the original data)
    teacher/                    the imported (or pretrained) teacher
    teacher-corrected/          after teacher correction
    scores/                     importance scores
    students/<name>/pruned/     each student variant, pruned ...
    students/<name>/distilled/  ... and distilled
    eval/<model>.<corpus>/      validation metrics of every model on both corpora
    hf/<model>/                 Hugging Face exports (the corrected teacher and the students)
    stages/<step>.json          done-markers: the resolved config each step ran with + metrics
    report.md, plots/           the report
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from minitron_mcore.pipeline.config import PipelineConfig, data_config

STAGES = (
    "tokenizer",
    "teacher",
    "correct",
    "importance",
    "prune",
    "distill",
    "evaluate",
    "export",
    "report",
)


@dataclass
class Step:
    id: str
    """``correct``, ``prune.width``, ``evaluate.teacher.distill`` ..."""
    stage: str
    command: str
    """The CLI command that runs this step alone ('' for the pipeline's own steps)."""
    config: Any
    """The command's config dataclass (what the marker records)."""
    output: str
    run: Callable[[], dict]
    variant: str = ""
    """The student variant this step belongs to ('' for the shared steps)."""
    tokens: int = 0
    """Training tokens this step consumes (the budget a dry run prints)."""
    owned: list = field(default_factory=list)
    """Paths this step writes inside the run directory (removed by ``rerun_from``)."""


def _flat_from(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat_from(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def _train_tokens(train) -> int:
    return train.steps * train.global_batch_size * train.seq_length


def teacher_arch(cfg: PipelineConfig):
    """The teacher's shape before anything runs: its config.json, its checkpoint, or the
    model the default run pretrains."""
    from minitron_mcore.checkpoint import hf_io, hf_mapping
    from minitron_mcore.checkpoint.megatron import read_meta

    source = _flat_from(cfg.pipeline.from_).get("teacher") or cfg.teacher
    if not source:
        return cfg.pretrain.model
    if _is_hf_dir(source):
        return hf_mapping.arch_from_hf_config(hf_io.read_hf_config(source))
    return read_meta(source).arch


def _is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
        os.path.join(path, "minitron.json")
    )


class _Planner:
    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.run = cfg, cfg.run_dir
        self.given = _flat_from(cfg.pipeline.from_)
        self.skip = set(cfg.pipeline.skip)
        self.steps: list[Step] = []

    def path(self, *parts) -> str:
        return os.path.join(self.run, *parts)

    def add(self, step: Step, passthrough: Optional[str] = None) -> str:
        """Add ``step`` unless given (``pipeline.from``) or skipped; its output either way."""
        if step.id in self.given:
            return self.given[step.id]
        if step.stage in self.skip or step.id in self.skip:
            return passthrough if passthrough is not None else step.output
        if not step.owned:
            step.owned = [step.output]
        self.steps.append(step)
        return step.output


def plan(cfg: PipelineConfig) -> list[Step]:
    """Every step of the run, in order (see the module docstring for the layout)."""
    from minitron_mcore.pipeline import steps as S

    p = _Planner(cfg)
    teacher, tokenizer = S.teacher_steps(p)
    corrected = p.add(S.correct_step(p, teacher), passthrough=teacher)
    scores = p.add(S.importance_step(p, corrected))
    models = {"teacher": teacher}
    if corrected != teacher:
        models["teacher-corrected"] = corrected
    students = {}
    for v in cfg.students:
        pruned = p.add(S.prune_step(p, v, corrected, scores))
        distilled = p.add(S.distill_step(p, v, pruned, corrected), passthrough=pruned)
        models[f"{v.name}.pruned"] = pruned
        if distilled != pruned:
            models[f"{v.name}.distilled"] = distilled
        students[v.name] = distilled
    for name, ckpt in models.items():
        for corpus in ("distill", "original"):
            p.add(S.evaluate_step(p, name, ckpt, corpus))
    for name, ckpt in [("teacher", corrected)] + list(students.items()):
        p.add(S.export_step(p, name, ckpt))
    p.add(S.report_step(p))
    del tokenizer
    return p.steps


def stage_data(cfg: PipelineConfig, corpus: str):
    """A stage's ``data.*`` for ``corpus`` (``original`` or ``distill``)."""
    return data_config(cfg, getattr(cfg.data, corpus))


def replace(obj, **changes):
    return dataclasses.replace(obj, **changes)
