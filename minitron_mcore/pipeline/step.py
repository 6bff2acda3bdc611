"""A pipeline step (one command's config, its output, the call that runs it) and the planner
that collects them: the pieces every step builder (:mod:`.steps`) shares."""

from __future__ import annotations

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


def flat_from(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(flat_from(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def train_tokens(train) -> int:
    """The tokens a training command's ``train.*`` consumes."""
    return train.steps * train.global_batch_size * train.seq_length


class Planner:
    """Collects the steps of one run; ``teacher`` is the teacher's shape (read before planning,
    so that planning itself reads nothing)."""

    def __init__(self, cfg: PipelineConfig, teacher):
        self.cfg, self.run, self.teacher = cfg, cfg.run_dir, teacher
        self.given = flat_from(cfg.pipeline.from_)
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


def stage_data(cfg: PipelineConfig, corpus: str):
    """A stage's ``data.*`` for ``corpus`` (``original`` or ``distill``)."""
    return data_config(cfg, getattr(cfg.data, corpus))
