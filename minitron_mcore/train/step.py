"""One optimizer step (or one validation pass) over a global batch with Megatron's schedules.

Losses follow Megatron's per-token contract (``calculate_per_token_loss``): a ``loss_func``
returns ``(loss sum, token count, {name: [sum, count], ...})``. The dict may report several
named values (``lm loss``, ``kd loss`` ...); they are summed over micro-batches and
data-parallel ranks and divided once, so every figure is an exact token mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from minitron_mcore.parallel import to_device
from minitron_mcore.train.losses import lm_loss_per_token, masked_mean

LM = "lm loss"


def _lm_loss_func(vocab_size, labels, loss_mask, output):
    """Megatron's per-token-loss contract: (loss sum, token count, {name: [sum, count]})."""
    total, count = masked_mean(lm_loss_per_token(output, labels, vocab_size), loss_mask)
    report = torch.stack([total.detach(), count.detach()])
    return total, count.to(torch.int), {LM: report}


def lm_forward_step(vocab_size: int):
    """forward_step_func for Megatron's schedules: batch dict -> logits -> LM loss."""

    def step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"]
        logits = model(tokens, batch["position_ids"], None)
        return logits, partial(_lm_loss_func, vocab_size, batch["labels"], batch["loss_mask"])

    return step


@dataclass
class Objective:
    """What a training stage optimises, as the engine sees it.

    ``forward_step`` / ``eval_step`` are Megatron ``forward_step_func``s (training, validation;
    validation may report more or fewer values); ``primary`` is the report name that is
    optimised (logged as ``train/loss``, checked for divergence); ``model`` maps the DDP-wrapped
    student to what the schedules run (a teacher/student pair for distillation);
    ``adjust_tensor_shapes_fn`` widens the tensors sent between pipeline stages."""

    forward_step: Callable
    eval_step: Optional[Callable] = None
    primary: str = LM
    model: Optional[Callable] = None
    adjust_tensor_shapes_fn: Optional[Callable] = None

    def schedule_model(self, ddp):
        return self.model(ddp) if self.model is not None else ddp


def lm_objective(vocab_size: int) -> Objective:
    return Objective(forward_step=lm_forward_step(vocab_size))


def reduce_reports(losses: list[dict], group=None) -> dict[str, float]:
    """``{name: token mean}`` over micro-batches (and ``group``, e.g. data-parallel ranks) of
    the last pipeline stage; ``{}`` elsewhere. Every rank of ``group`` must call it."""
    if not losses:
        return {}
    names = sorted(losses[0])
    tot = torch.stack([torch.stack([x[n] for x in losses]).sum(0).float() for n in names])
    if group is not None:
        torch.distributed.all_reduce(tot, group=group)  # [names, 2]
    means = (tot[:, 0] / tot[:, 1].clamp(min=1)).tolist()  # one host sync for all names
    return dict(zip(names, means))


def run_schedule(
    model,
    forward_step,
    microbatches: list[dict],
    seq_length: int,
    forward_only: bool,
    adjust_tensor_shapes_fn=None,
) -> list[dict]:
    """Megatron's pipeline schedule over this rank's micro-batches; returns the per-micro-batch
    loss reports (last pipeline stage; empty elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    kw = {}
    if adjust_tensor_shapes_fn is not None and ps.get_pipeline_model_parallel_world_size() > 1:
        kw["adjust_tensor_shapes_fn"] = adjust_tensor_shapes_fn  # only the 1F1B schedule takes it
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        # The data boundary: each micro-batch is copied to the models' device as the schedule
        # takes it (asynchronously from pinned memory), student and teacher read that copy.
        data_iterator=map(to_device, microbatches),
        model=model,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only,
        **kw,
    )


def train_step(
    model,
    optimizer,
    scheduler,
    forward_step,
    microbatches,
    seq_length: int,
    shapes_fn=None,
    accept: Optional[Callable[[dict], bool]] = None,
):
    """Forward/backward over ``microbatches`` (this DP rank's share of the global batch), then
    one optimizer and scheduler step. Returns (reports, grad_norm, lr); ``reports`` is
    ``{name: token mean}`` on the last pipeline stage, ``{}`` elsewhere. ``accept(reports)``,
    called on every rank between backward and the update, can refuse the step (a loss that is
    not finite must not reach the weights): then nothing is updated and grad_norm is None."""
    from megatron.core import parallel_state as ps

    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(model, forward_step, microbatches, seq_length, False, shapes_fn)
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
    reports = {}
    if ps.is_pipeline_last_stage():
        reports = reduce_reports(losses, ps.get_data_parallel_group())
    if accept is not None and not accept(reports):
        return reports, None, lr
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return reports, grad_norm, lr
