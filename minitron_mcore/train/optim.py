"""Megatron DDP, Megatron optimizer and ``OptimizerParamScheduler`` from small configs."""

from __future__ import annotations

import contextlib

from minitron_mcore.errors import require
from minitron_mcore.train import fast_paths
from minitron_mcore.train.config import TrainConfig, check_schedule
from minitron_mcore.train.fast_paths import use_distributed_optimizer  # noqa: F401 (its old home)


def wrap_ddp(model, config, distributed_optimizer: bool, cfg: TrainConfig | None = None):
    """Megatron's DistributedDataParallel: contiguous fp32 grad buffers, DP all-reduce (or
    reduce-scatter with the distributed optimizer), overlapped with backward in buckets (and
    the parameter all-gather with forward) where ``train.overlap_*`` say so."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    overlap = {}
    if cfg is not None:
        dp = ps.get_data_parallel_world_size()
        overlap = fast_paths.ddp_kwargs(cfg, distributed_optimizer, dp)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=distributed_optimizer,
        average_in_collective=False,
        **overlap,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


@contextlib.contextmanager
def synced_params(ddp):
    """Parameters complete on every rank while the block runs (checkpoint saves, validation):
    with ``overlap_param_gather`` the all-gather of the distributed optimizer's update waits
    for the next forward's hooks. As Megatron-LM does around its saves and evaluations, the
    hooks are taken off (which gathers synchronously) and put back after."""
    if not getattr(ddp, "use_forward_hook", False):
        yield
        return
    ddp.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        ddp.enable_forward_pre_hook()


def build_optimizer(model, cfg: TrainConfig, config, distributed_optimizer: bool):
    """Megatron optimizer over a DDP-wrapped model (FP32 or mixed precision per ``config``)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    require(
        cfg.lr > 0 and 0 <= cfg.min_lr <= cfg.lr,
        f"train.lr={cfg.lr} / train.min_lr={cfg.min_lr}: need 0 <= min_lr <= lr and lr > 0",
    )
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        clip_grad=cfg.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=distributed_optimizer,
        overlap_param_gather=model.ddp_config.overlap_param_gather,
    )
    return get_megatron_optimizer(opt_config, [model])


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int, override: bool = False):
    """Megatron's OptimizerParamScheduler: linear warmup, then ``decay_style`` to ``min_lr``
    at ``total_steps`` (counted in optimizer steps). ``override``: on resume, these settings
    replace the checkpoint's (``resume_override``) instead of having to equal them."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    check_schedule(cfg, total_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=max(total_steps, 1),
        lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        override_opt_param_scheduler=override,
        use_checkpoint_opt_param_scheduler=not override,
    )


def attach_to_config(config, model, optimizer) -> None:
    """Hook Megatron's schedules up to DDP and the optimizer (grad sync, loss scaling)."""
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    config.grad_scale_func = optimizer.scale_loss
