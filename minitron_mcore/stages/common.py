"""Pieces shared by the training-type stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from minitron_mcore.data.datasets import DataConfig
from minitron_mcore.parallel import ParallelConfig
from minitron_mcore.train.config import TrainConfig
from minitron_mcore.train.loop import TrainJob


@dataclass
class TrainingRunKeys:
    """The keys every training command shares (``pretrain``, ``correct``, ``distill``)."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234
    resume: str = "auto"
    """auto: continue from ``save`` if it holds this run; never: start over."""
    resume_override: list = field(default_factory=list)
    """Keys allowed to differ from the saved run on resume, e.g. [train.steps] to train
    longer on purpose (train/resume.py)."""
    overwrite: bool = False
    """Allow replacing an existing ``save`` that is not resumable."""

    def peak_lr_text(self) -> str:
        """The peak LR as a plan shows it before the run (a command whose rule needs the
        loaded checkpoint says so)."""
        return "unset" if self.train.lr is None else f"{self.train.lr:g}"


def describe_schedule(cfg: TrainingRunKeys) -> str:
    """A training command's LR schedule and token budget, as ``minitron pipeline``'s dry run
    prints it for each training step."""
    t = cfg.train
    low = "lr/10" if t.min_lr is None else f"{t.min_lr:g}"
    return (
        f"schedule: peak lr {cfg.peak_lr_text()} -> min lr {low}"
        f", {t.warmup_steps} warmup steps, {t.decay_style}, {t.steps} steps x global "
        f"batch {t.global_batch_size} x {t.seq_length} tokens"
    )


def finished_run(plan, save: str) -> dict:
    """A re-run of a finished command: report the stored metrics, train nothing.

    A run killed inside its last save, after the final version was complete but before the
    tracker named it (or before a new checkpoint directory was renamed into place), is finished
    too - its final version is what the run resumes from - but ``save`` still presents the one
    before. That version is made current here, as the next save would have done, so that what
    ``save`` presents is the finished run."""
    import torch.distributed as dist

    from minitron_mcore.checkpoint.megatron import recover_home
    from minitron_mcore.parallel import fail_together, launcher_ranks
    from minitron_mcore.utils.log import emit_metrics, log0

    def recover():
        recover_home(save.rstrip("/"))

    ranks = launcher_ranks()
    if dist.is_initialized():  # inside the pipeline: the other ranks read it next
        fail_together(recover, rank0_only=True)
    elif ranks is None or ranks[0] == 0:
        recover()  # before the process group: the other ranks only report and exit
    log0("save=%s already holds this finished run; nothing to do (metrics below)", save)
    emit_metrics(plan.finished, None)
    return plan.finished


def check_room_for_checkpoint(save: str, arch) -> None:
    """Before the first step: ``save`` can be written and has room for a training checkpoint
    of ``arch`` (weights and optimizer state), rather than failing at the first save."""
    from minitron_mcore.utils import preflight

    preflight.require_writable(save, "save")
    need = preflight.checkpoint_bytes(arch.num_params(), training=True)
    preflight.require_free_disk(save, need, "a training checkpoint", "save")


def train_job(
    stage: str, cfg: TrainingRunKeys, plan, signature: dict, model, meta, tokenizer, train, **job
) -> TrainJob:
    """The engine's job for training command ``stage``: the keys every training command
    shares (data, save, seed), how it resumes (``plan``, from ``plan_resume``), the model to
    train with its sidecar and tokenizer, and ``job``'s other fields (objective, ...)."""
    return TrainJob(
        stage=stage,
        model=model,
        meta=meta,
        tokenizer=tokenizer,
        train=train,
        data=cfg.data,
        save=cfg.save,
        seed=cfg.seed,
        resume_from=plan.source,
        signature=signature,
        override_schedule=plan.override_schedule,
        **job,
    )
