"""``minitron correct``: teacher correction (Minitron, arXiv 2408.11796 sec. 2).

    minitron correct load=runs/teacher save=runs/teacher-corrected data.train=[my.jsonl] \\
        original_lr=3e-4

The original model never saw the distillation data; a light fine-tune on it fixes the teacher's
sub-word distribution before it guides the pruned student. The papers' recipe is the default:
peak LR one fifth of the original model's peak (``lr_fraction``), the original global batch size,
120 warmup steps, cosine decay to the minimum LR. Any ``train.*`` key overrides it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from minitron_mcore.checkpoint.layout import resolve_tokenizer_path
from minitron_mcore.checkpoint.megatron import load_model, read_meta
from minitron_mcore.data.datasets import require_data
from minitron_mcore.data.tokenizer import Tokenizer, check_tokenizer_vocab
from minitron_mcore.errors import require
from minitron_mcore.models.build import dtype_name, train_dtype
from minitron_mcore.parallel import parallel_context
from minitron_mcore.stages.common import (
    TrainingRunKeys,
    check_room_for_checkpoint,
    finished_run,
    train_job,
)
from minitron_mcore.train import fast_paths
from minitron_mcore.train.config import TrainConfig, resolve_train_config
from minitron_mcore.train.loop import run_training
from minitron_mcore.train.resume import plan_resume, run_signature
from minitron_mcore.utils.log import emit_metrics, log0


@dataclass
class CorrectConfig(TrainingRunKeys):
    """``minitron correct``: fine-tune the teacher on the distillation data."""

    load: str = ""
    """The original (teacher) checkpoint."""
    save: str = ""
    """Output checkpoint (resumed automatically if it holds this run's state)."""
    original_lr: Optional[float] = None
    """The original model's peak LR; null = read it from the checkpoint's training record."""
    lr_fraction: float = 0.2
    """Recipe: peak LR = original_lr x lr_fraction (1/5 in the papers)."""

    def peak_lr_text(self) -> str:
        if self.train.lr is not None:
            return f"{self.train.lr:g}"
        if self.original_lr:
            return f"{self.original_lr * self.lr_fraction:g}"
        return f"{self.lr_fraction:g} x the teacher's recorded peak"


def recipe(cfg: CorrectConfig, record: dict) -> TrainConfig:
    """Fill the recipe's free fields from the original run (``record``) where not overridden."""
    train = cfg.train
    if train.lr is None:
        original = cfg.original_lr or record.get("lr")
        require(
            original is not None and original > 0,
            "the checkpoint has no training record to take the original peak LR from; "
            "pass original_lr= (e.g. 3e-4 for Llama-3.1-8B) or train.lr=",
        )
        train = dataclasses.replace(train, lr=original * cfg.lr_fraction)
    if train.global_batch_size is None:
        gbs = record.get("global_batch_size")
        require(
            gbs is not None,
            "the checkpoint has no record of the original global batch "
            "size; pass train.global_batch_size=",
        )
        train = dataclasses.replace(train, global_batch_size=gbs)
    return train


def correct(cfg: CorrectConfig) -> dict:
    meta = read_meta(cfg.load)
    meta.arch.check_parallel(cfg.parallel.tp, cfg.parallel.pp)
    train = resolve_train_config(
        recipe(cfg, meta.train_state or {}), meta.arch.max_position_embeddings, cfg.parallel
    )
    require_data(cfg.data)
    tokenizer = Tokenizer(resolve_tokenizer_path(cfg.load))
    check_tokenizer_vocab(tokenizer, meta.arch.vocab_size)
    dtype = train_dtype(train.precision)
    signature = run_signature(
        "correct", train, cfg.data, cfg.seed, dtype_name(dtype), load=meta.checkpoint_id
    )
    plan = plan_resume(cfg.save, cfg.resume, cfg.overwrite, signature, cfg.resume_override)
    if plan.finished:
        return finished_run(plan, cfg.save)
    check_room_for_checkpoint(cfg.save, meta.arch)
    with parallel_context(cfg.parallel, cfg.seed):
        log0(
            "correct: %s, peak lr %.3g (x%.2f of the original), warmup %d, %s decay to %.3g, "
            "global batch %d",
            cfg.load,
            train.lr,
            cfg.lr_fraction,
            train.warmup_steps,
            train.decay_style,
            train.min_lr,
            train.global_batch_size,
        )
        model, _ = load_model(
            cfg.load,
            dtype,
            **fast_paths.model_kwargs(train, cfg.parallel),
        )
        meta = dataclasses.replace(meta, dtype=dtype_name(dtype))
        job = train_job("correct", cfg, plan, signature, model, meta, tokenizer, train)
        metrics = run_training(job)
    emit_metrics(metrics, cfg.save)
    return metrics
