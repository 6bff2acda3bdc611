"""The ``train.*`` keys shared by every training-type command."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from minitron_mcore.errors import require
from minitron_mcore.train import fast_paths


@dataclass
class TrainConfig:
    """Schedule, batch, optimizer and logging of a training run."""

    steps: int = 100
    """Optimizer steps."""
    seq_length: int = 256
    """Tokens per sample."""
    global_batch_size: Optional[int] = 16
    """Samples per optimizer step over all data-parallel ranks (gradient accumulation fills
    the gap to micro_batch_size x DP)."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one rank."""
    lr: Optional[float] = 3e-4
    """Peak learning rate (``correct`` derives it from the original model's when null)."""
    min_lr: Optional[float] = None
    """Final learning rate of the decay; null = lr / 10."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    decay_style: str = "cosine"
    """cosine, linear or constant."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    distributed_optimizer: str = "auto"
    """Shard optimizer state over DP ranks: auto (on GPU), true, false."""
    recompute: str = "auto"
    """Activation recomputation: auto (selective from 8192-token samples on GPUs, else none),
    none, selective (core attention) or full (every layer). ``train/fast_paths.py``."""
    gradient_accumulation_fusion: str = "auto"
    """Accumulate weight gradients into the fp32 main grads inside the GEMM: auto (on GPUs
    with Apex's kernel, as in NGC containers), true, false."""
    overlap_grad_reduce: str = "auto"
    """Overlap the data-parallel gradient reduction with backward, in buckets: auto (on GPUs
    with DP > 1), true, false."""
    overlap_param_gather: str = "auto"
    """With the distributed optimizer, overlap the parameter all-gather with the next forward:
    auto (on GPUs with DP > 1), true, false."""
    precision: str = "auto"
    """auto (bf16 on GPUs that support it, fp32 otherwise), fp32 or bf16."""
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    eval_interval: int = 50
    """Validate every N steps (and at the end); 0 = only at the end."""
    eval_iters: int = 4
    """Validation global batches (a fixed set, the same at every evaluation)."""
    save_interval: int = 0
    """Save a resumable checkpoint every N steps (always at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Checkpoint versions (``iter_<step>``) kept in ``save``; older ones are deleted once a
    newer one is complete."""
    log_interval: int = 10
    """Log a line every N steps when there is no terminal for the progress bar."""
    log_dir: str = ""
    """TensorBoard / JSONL logs; empty = ``<save>.logs``."""
    tensorboard: bool = True
    wandb: str = "disabled"
    """disabled, offline (never needs a login) or online."""
    wandb_project: str = "minitron"


def check_schedule(cfg: TrainConfig, total_steps: int) -> None:
    """The LR schedule's keys against a run of ``total_steps`` optimizer steps."""
    require(
        cfg.decay_style in ("cosine", "linear", "constant"),
        f"train.decay_style={cfg.decay_style!r}: use cosine, linear or constant",
    )
    require(
        0 <= cfg.warmup_steps < max(total_steps, 1) or total_steps == 0,
        f"train.warmup_steps={cfg.warmup_steps} must be below train.steps={total_steps}",
    )


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
    check_schedule(cfg, cfg.steps)
    require(cfg.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1")
    if parallel is not None:
        from minitron_mcore.parallel import world_size

        dp = max(world_size() // (parallel.tp * parallel.pp), 1)
        require(
            cfg.global_batch_size % (cfg.micro_batch_size * dp) == 0,
            f"train.global_batch_size={cfg.global_batch_size} is not divisible by "
            f"train.micro_batch_size={cfg.micro_batch_size} x data-parallel size {dp}; "
            "make it a multiple",
        )
        # the fast-path keys, checked before any work (they are read again at set-up)
        fast_paths.model_kwargs(cfg, parallel)
        fast_paths.ddp_kwargs(cfg, fast_paths.use_distributed_optimizer(cfg), dp)
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    return dataclasses.replace(cfg, min_lr=min_lr)
