"""``minitron pipeline`` configuration: one tree, each stage's keys under its own name.

Every stage reads only its own sub-config (plus the run directory, the data and the parallel
layout, which all stages share); the stage functions themselves are the single commands'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from minitron_mcore.data.datasets import DataConfig
from minitron_mcore.importance.command import ImportanceConfig
from minitron_mcore.models.arch import ModelArch
from minitron_mcore.parallel import ParallelConfig
from minitron_mcore.prune.plan import PruneTarget
from minitron_mcore.stages.distill import DistillOptions
from minitron_mcore.train.config import TrainConfig


def _demo_teacher() -> ModelArch:
    """The default run's teacher: a small Llama-3-style model that trains in minutes on CPU."""
    return ModelArch(
        family="llama",
        num_layers=8,
        hidden_size=128,
        ffn_hidden_size=384,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=16,
        vocab_size=512,
        max_position_embeddings=2048,
        rotary_base=500000.0,
    )


def _train(**kw) -> TrainConfig:
    base = dict(
        seq_length=128,
        global_batch_size=16,
        micro_batch_size=8,
        eval_iters=4,
        eval_interval=50,
        log_interval=20,
    )
    return TrainConfig(**{**base, **kw})


@dataclass
class PipelineData:
    """The two corpora of the method (each entry as in ``data.train`` of the commands)."""

    original: list = field(default_factory=lambda: ["demo:stdlib-code"])
    """The teacher's original training data (the default run pretrains on it; every model is
    also evaluated on it: what the students keep of the teacher's knowledge)."""
    distill: list = field(default_factory=lambda: ["demo:stdlib-docs"])
    """The distillation data: teacher correction, calibration and distillation use it."""
    split: str = "95,5,0"
    """Train/valid split of each corpus (validation comes from the held-out share)."""
    cache_dir: str = ""
    """Tokenized data; empty = ``<run_dir>/data``."""


@dataclass
class TeacherPretrain:
    """Only when no ``teacher=`` is given: the small teacher the default run trains."""

    model: ModelArch = field(default_factory=_demo_teacher)
    train: TrainConfig = field(
        default_factory=lambda: _train(steps=600, lr=3e-3, min_lr=3e-4, warmup_steps=30)
    )
    tokenizer: str = ""
    """Tokenizer directory; empty = a 512-token byte-level BPE trained on the original data."""


@dataclass
class CorrectStage:
    """Teacher correction on the distillation data (``minitron correct``)."""

    train: TrainConfig = field(
        default_factory=lambda: _train(steps=120, lr=None, warmup_steps=12, eval_interval=0)
    )
    original_lr: Optional[float] = None
    """The teacher's original peak LR (null: from its training record, e.g. the default run)."""
    lr_fraction: float = 0.2


@dataclass
class StudentVariant:
    """One student: a prune target (depth first, then width), then distilled."""

    name: str = "width"
    target: PruneTarget = field(default_factory=PruneTarget)
    drop_layers: list = field(default_factory=list)
    depth_metric: str = "block_loss"
    agg: str = ""
    expert_metric: str = "score"
    moe_neurons: str = "per_expert"


def _default_students() -> list:
    # About half the teacher's parameters each (the papers' 8B -> 4B): by width, by depth.
    return [
        StudentVariant("width", PruneTarget(hidden_size=96, ffn_hidden_size=192)),
        StudentVariant("depth", PruneTarget(num_layers=4)),
    ]


@dataclass
class DistillStage:
    """Retraining of each student (``minitron distill``)."""

    distill: DistillOptions = field(default_factory=DistillOptions)
    train: TrainConfig = field(
        default_factory=lambda: _train(steps=250, lr=2e-3, min_lr=2e-4, warmup_steps=10)
    )


@dataclass
class EvaluateStage:
    """Validation loss of every model on both corpora (``minitron evaluate``)."""

    seq_length: int = 128
    global_batch_size: int = 16
    micro_batch_size: int = 8
    iters: int = 8
    generate_tokens: int = 64
    """Greedy tokens per prompt when measuring each exported model's generation speed."""
    lm_eval_tasks: list[str] = field(default_factory=lambda: ["minitron_stdlib_mc"])
    """lm-evaluation-harness tasks scored for every model (with the distillation-data
    evaluation); the default is the local multiple-choice task shipped in
    examples/lm_eval_tasks (offline). [] = none."""
    lm_eval_include: list[str] = field(default_factory=list)
    """Task directories; empty = examples/lm_eval_tasks of this checkout, when present."""
    lm_eval_limit: Optional[float] = None
    """Documents per task (a fraction when < 1); null = all."""


@dataclass
class PipelineOptions:
    """``pipeline.*``: which stages run."""

    skip: list[str] = field(default_factory=list)
    """Stages not to run (their input passes through), e.g. [correct]."""
    rerun_from: str = ""
    """Run this stage and every later one again although they are done (their outputs are
    replaced); a changed config of a finished stage needs it."""
    from_: dict[str, str] = field(default_factory=dict)
    """``pipeline.from.<stage>=PATH``: use PATH as the stage's output instead of running it."""
    dry_run: bool = False
    """Print every stage's resolved command and the token budget, run nothing."""
    offline_logits: bool = False
    """Run the corrected teacher once over the distillation data (``minitron teacher-logits``)
    and distil every student from its stored top-k predictions (no teacher in memory while the
    students train; the online loss is ``distill.top_k``'s at k = ``offline_top_k``)."""
    offline_top_k: int = 64
    offline_precision: str = "bf16"
    """bf16 or int8 log-probabilities."""


@dataclass
class PipelineConfig:
    """``minitron pipeline``: correct -> importance -> prune -> distill -> evaluate -> report."""

    run_dir: str = ""
    """Where every stage writes its outputs, done-markers, and report.md."""
    teacher: str = ""
    """A Hugging Face model directory or a minitron checkpoint; empty = pretrain a small
    teacher on ``data.original`` (the default run)."""
    data: PipelineData = field(default_factory=PipelineData)
    pretrain: TeacherPretrain = field(default_factory=TeacherPretrain)
    correct: CorrectStage = field(default_factory=CorrectStage)
    importance: ImportanceConfig = field(
        default_factory=lambda: ImportanceConfig(
            num_samples=256, seq_length=128, micro_batch_size=8, layer_loss_samples=64
        )
    )
    students: list[StudentVariant] = field(default_factory=_default_students)
    """Student variants (name, prune target); each is distilled and evaluated."""
    distill: DistillStage = field(default_factory=DistillStage)
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    export_dtype: str = "auto"
    """dtype of the exported Hugging Face students."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)


def data_config(cfg: PipelineConfig, train: list, valid: Optional[list] = None) -> DataConfig:
    """A stage's ``data.*``: the shared cache and split, the given corpora."""
    import os

    cache = cfg.data.cache_dir or os.path.join(cfg.run_dir, "data")
    return DataConfig(
        train=list(train), valid=list(valid or []), split=cfg.data.split, cache_dir=cache
    )
