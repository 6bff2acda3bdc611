"""One optimizer step over a global batch with Megatron's pipeline schedules."""

from __future__ import annotations

from functools import partial

import torch

from minitron_mcore.train.losses import lm_loss_per_token, masked_mean


def _lm_loss_func(vocab_size, labels, loss_mask, output):
    """Megatron's per-token-loss contract: (loss sum, token count, {name: [sum, count]})."""
    total, count = masked_mean(lm_loss_per_token(output, labels, vocab_size), loss_mask)
    report = torch.stack([total.detach(), count.detach()])
    return total, count.to(torch.int), {"lm loss": report}


def lm_forward_step(vocab_size: int):
    """forward_step_func for Megatron's schedules: batch dict -> logits -> LM loss."""

    def step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"]
        logits = model(tokens, batch["position_ids"], None)
        return logits, partial(_lm_loss_func, vocab_size, batch["labels"], batch["loss_mask"])

    return step


def reduce_lm_loss(losses: list[dict]) -> float:
    """Mean token loss of one step over micro-batches and data-parallel ranks (last PP stage;
    other stages return NaN). Returned on every rank of the last stage."""
    from megatron.core import parallel_state as ps

    if not losses:
        return float("nan")
    tot = torch.stack([x["lm loss"] for x in losses]).sum(0)
    torch.distributed.all_reduce(tot, group=ps.get_data_parallel_group())
    return (tot[0] / tot[1].clamp(min=1)).item()


def run_schedule(
    model, forward_step, microbatches: list[dict], seq_length: int, forward_only: bool
) -> list[dict]:
    """Megatron's pipeline schedule over this rank's micro-batches; returns the per-micro-batch
    loss reports (last pipeline stage; empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=model,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )


def train_step(model, optimizer, scheduler, forward_step, microbatches, seq_length: int):
    """Forward/backward over ``microbatches`` (this DP rank's share of the global batch), then
    one optimizer and scheduler step. Returns (loss, grad_norm, lr)."""
    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(model, forward_step, microbatches, seq_length, forward_only=False)
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return reduce_lm_loss(losses), grad_norm, lr
