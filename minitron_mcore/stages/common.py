"""Pieces shared by the training-type stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minitron_mcore.data.datasets import DataConfig
from minitron_mcore.errors import require
from minitron_mcore.models.build import resolve_dtype
from minitron_mcore.parallel import ParallelConfig
from minitron_mcore.train.config import TrainConfig


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


def train_dtype(precision: str) -> torch.dtype:
    """``train.precision``: auto = bf16 on a GPU that supports it, fp32 otherwise."""
    require(
        precision in ("auto", "fp32", "bf16"),
        f"train.precision={precision!r}: use auto, fp32 or bf16",
    )
    if precision == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return resolve_dtype(precision)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def check_tokenizer_vocab(tokenizer, vocab_size: int) -> None:
    require(
        tokenizer.vocab_size <= vocab_size,
        f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
        f"{vocab_size}; they do not belong together - use the model's tokenizer",
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
