"""The ``train.*`` keys shared by every training-type command."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
