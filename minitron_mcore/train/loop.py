"""The training loop every training stage uses (pretrain, correct, later distill).

Megatron does the heavy lifting (schedules, DDP, optimizer, LR schedule); this loop adds the
data position, validation, logging, checkpoints, exact resume and clean preemption.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from minitron_mcore.checkpoint.megatron import CheckpointMeta
from minitron_mcore.data.datasets import DataConfig, GlobalBatches, build_datasets
from minitron_mcore.data.tokenizer import Tokenizer
from minitron_mcore.errors import require
from minitron_mcore.parallel import comm_device
from minitron_mcore.train import optim
from minitron_mcore.train.config import TrainConfig
from minitron_mcore.train.logger import RunLogger
from minitron_mcore.train.state import (
    has_train_state,
    load_training_checkpoint,
    save_training_checkpoint,
)
from minitron_mcore.train.step import lm_forward_step, run_schedule, train_step
from minitron_mcore.utils.log import log0


@dataclass
class TrainJob:
    """Everything a stage hands to :func:`run_training`."""

    stage: str
    model: torch.nn.Module  # this rank's GPTModel (already holding initial weights)
    meta: CheckpointMeta
    tokenizer: Tokenizer
    train: TrainConfig
    data: DataConfig
    save: str
    seed: int
    forward_step: Optional[Callable] = None  # default: language-model loss
    resume_from: Optional[str] = None  # a training checkpoint to continue
    extra_metrics: dict = field(default_factory=dict)


class _Preemption:
    """SIGTERM (SLURM preemption / time limit) asks for a checkpoint at the next step."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank if any rank got the signal."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


@torch.no_grad()
def evaluate(model, forward_step, batches: list[list[dict]], seq_length: int) -> float:
    """Mean token loss over fixed validation batches (every rank of the last stage gets it;
    the value is broadcast so every rank returns the same number)."""
    from megatron.core import parallel_state as ps

    model.eval()
    tot = torch.zeros(2, device=comm_device())
    for mbs in batches:
        losses = run_schedule(model, forward_step, mbs, seq_length, forward_only=True)
        if ps.is_pipeline_last_stage():
            tot += torch.stack([x["lm loss"] for x in losses]).sum(0).float()
    if ps.is_pipeline_last_stage():
        dist.all_reduce(tot, group=ps.get_data_parallel_group())
    # The last stage holds the sum; make it known to every rank.
    dist.all_reduce(tot, op=dist.ReduceOp.MAX)
    model.train()
    return (tot[0] / tot[1].clamp(min=1)).item()


def _broadcast_loss(loss: float) -> float:
    """Train loss lives on the last pipeline stage; share it with everyone for logging."""
    t = torch.tensor([-math.inf if math.isnan(loss) else loss], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def resolve_train_config(cfg: TrainConfig, max_positions: int, parallel=None) -> TrainConfig:
    """Validate ``train.*`` before any work starts and fill derived defaults (min_lr)."""
    require(cfg.steps > 0, f"train.steps={cfg.steps} must be positive")
    require(cfg.lr is not None and cfg.lr > 0, "train.lr must be set to a positive value")
    require(
        cfg.global_batch_size is not None and cfg.global_batch_size > 0,
        "train.global_batch_size must be set to a positive value",
    )
    require(cfg.micro_batch_size > 0, "train.micro_batch_size must be positive")
    require(
        0 < cfg.seq_length <= max_positions,
        f"train.seq_length={cfg.seq_length} exceeds the model's maximum sequence length "
        f"{max_positions}; use a shorter train.seq_length",
    )
    require(
        0 <= cfg.warmup_steps < cfg.steps,
        f"train.warmup_steps={cfg.warmup_steps} must be below train.steps={cfg.steps}",
    )
    if parallel is not None:
        from minitron_mcore.parallel import world_size

        dp = max(world_size() // (parallel.tp * parallel.pp), 1)
        require(
            cfg.global_batch_size % (cfg.micro_batch_size * dp) == 0,
            f"train.global_batch_size={cfg.global_batch_size} is not divisible by "
            f"train.micro_batch_size={cfg.micro_batch_size} x data-parallel size {dp}; "
            "make it a multiple",
        )
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    return dataclasses.replace(cfg, min_lr=min_lr)


def run_training(job: TrainJob) -> dict:
    """Train ``job.model`` for ``job.train.steps`` steps; resumable; returns final metrics."""
    from megatron.core import parallel_state as ps

    cfg = job.train
    model = job.model
    vocab = job.meta.arch.vocab_size
    forward_step = job.forward_step or lm_forward_step(vocab)
    use_dist_opt = optim.use_distributed_optimizer(cfg)
    ddp = optim.wrap_ddp(model, model.config, use_dist_opt)
    opt = optim.build_optimizer(ddp, cfg, model.config, use_dist_opt)
    sched = optim.build_scheduler(opt, cfg, cfg.steps)
    optim.attach_to_config(model.config, ddp, opt)

    start = 0
    if job.resume_from:
        # Weights go through the unwrapped model: DDP's state-dict names carry a 'module.' prefix.
        state = load_training_checkpoint(job.resume_from, model, opt, sched)
        start = state["iteration"]
        log0("resumed %s at step %d/%d", job.resume_from, start, cfg.steps)

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    train_ds, valid_ds = build_datasets(
        job.data,
        job.tokenizer,
        cfg.seq_length,
        job.seed,
        train_samples=cfg.steps * cfg.global_batch_size,
        valid_samples=cfg.eval_iters * cfg.global_batch_size,
    )
    batches = GlobalBatches(train_ds, cfg.global_batch_size, cfg.micro_batch_size, dp_rank, dp)
    eval_batches = []
    if valid_ds is not None and cfg.eval_iters > 0:
        vb = GlobalBatches(valid_ds, cfg.global_batch_size, cfg.micro_batch_size, dp_rank, dp)
        eval_batches = [vb.get(i) for i in range(cfg.eval_iters)]

    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    log_dir = cfg.log_dir or job.save.rstrip("/") + ".logs"
    logger = RunLogger(
        log_dir,
        cfg.steps,
        start,
        tokens_per_step,
        cfg.tensorboard,
        cfg.wandb,
        cfg.wandb_project,
        job.stage,
        cfg.log_interval,
        config=dataclasses.asdict(cfg),
    )
    preempt = _Preemption()
    tok_files = job.tokenizer.files()

    def save(step: int) -> None:
        train_state = {
            "iteration": step,
            "consumed_samples": step * cfg.global_batch_size,
            "stage": job.stage,
            "steps": cfg.steps,
            "lr": cfg.lr,
            "min_lr": cfg.min_lr,
            "global_batch_size": cfg.global_batch_size,
            "seq_length": cfg.seq_length,
            "seed": job.seed,
        }
        meta = job.meta.with_step(job.stage, iteration=step, steps=cfg.steps)
        meta = dataclasses.replace(meta, train_state=train_state)
        save_training_checkpoint(job.save, model, opt, sched, meta, train_state, tok_files)

    first_loss = last_loss = float("nan")
    val_losses = {}
    if eval_batches and start == 0:
        val_losses[0] = evaluate(ddp, forward_step, eval_batches, cfg.seq_length)
        logger.scalars(0, {"valid/loss": val_losses[0]})
        log0("step 0 validation loss %.4f", val_losses[0])
    t0, step, preempted = time.time(), start, False
    try:
        for step in range(start + 1, cfg.steps + 1):
            loss, grad_norm, lr = train_step(
                ddp, opt, sched, forward_step, batches.get(step - 1), cfg.seq_length
            )
            loss = _broadcast_loss(loss)
            require(
                math.isfinite(loss),
                f"training diverged at step {step} (loss {loss}); lower train.lr or check the data",
            )
            first_loss = loss if math.isnan(first_loss) else first_loss
            last_loss = loss
            logger.step(step, loss, lr, float(grad_norm or 0.0))
            if eval_batches and cfg.eval_interval and step % cfg.eval_interval == 0:
                val_losses[step] = evaluate(ddp, forward_step, eval_batches, cfg.seq_length)
                logger.scalars(step, {"valid/loss": val_losses[step]})
            if preempt.agreed():
                log0("SIGTERM: saving a checkpoint at step %d and exiting", step)
                save(step)
                preempted = True
                break
            if step < cfg.steps and cfg.save_interval and step % cfg.save_interval == 0:
                save(step)
        if not preempted:
            if eval_batches and step not in val_losses:
                val_losses[step] = evaluate(ddp, forward_step, eval_batches, cfg.seq_length)
                logger.scalars(step, {"valid/loss": val_losses[step]})
            save(step)
    finally:
        preempt.restore()
        logger.close()
    elapsed = time.time() - t0
    done = max(step - start, 0)
    metrics = {
        "command": job.stage,
        "save": job.save,
        "step": step,
        "steps": cfg.steps,
        "preempted": preempted,
        "first_train_loss": first_loss,
        "train_loss": last_loss,
        "tokens_per_s": done * tokens_per_step / max(elapsed, 1e-9),
        "seconds": round(elapsed, 3),
        "lr": cfg.lr,
        "min_lr": cfg.min_lr,
        "warmup_steps": cfg.warmup_steps,
        "global_batch_size": cfg.global_batch_size,
        "log_dir": log_dir,
        **job.extra_metrics,
    }
    if val_losses:
        metrics["initial_valid_loss"] = val_losses.get(0, val_losses[min(val_losses)])
        metrics["valid_loss"] = val_losses[max(val_losses)]
        metrics["valid_ppl"] = math.exp(min(metrics["valid_loss"], 50.0))
    return metrics


def resume_point(save: str, resume: str, overwrite: bool) -> Optional[str]:
    """Decide between resuming from ``save`` and starting fresh; refuse to clobber outputs."""
    require(resume in ("auto", "never"), f"resume={resume!r}: use auto or never")
    if os.path.exists(save):
        if resume == "auto" and has_train_state(save):
            return save
        require(
            overwrite,
            f"save={save} already exists and is not a resumable run of this "
            "command; choose a new directory or pass overwrite=true",
        )
    return None
