"""Forward passes through a (possibly TP/PP-sharded) GPTModel with Megatron's schedules."""

from __future__ import annotations

from functools import partial

import torch

from minitron_mcore.models.arch import ModelArch


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


def _gather_logits(vocab_size: int, output: torch.Tensor, non_loss_data: bool = True):
    """[b, s, v/tp] vocab-parallel logits -> [b, s, vocab] on every TP rank (padding dropped)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(output)[..., :vocab_size].detach()


@torch.no_grad()
def forward_logits(
    model, tokens: torch.Tensor, arch: ModelArch, micro_batch_size: int | None = None
):
    """Full-vocabulary logits [b, s, vocab] on the last pipeline stage; ``None`` elsewhere.

    Debug/evaluation helper: it gathers the vocab-parallel logits, which training never does.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from minitron_mcore.parallel import to_device

    mbs = micro_batch_size or tokens.shape[0]
    chunks = list(torch.split(to_device(tokens), mbs))  # [mbs, s] each, on the models' device

    def step(data_iter, model):
        t = next(data_iter)
        out = model(t, position_ids(t), None)
        return out, partial(_gather_logits, arch.vocab_size)

    model.eval()
    outs = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(chunks),
        model=model,
        num_microbatches=len(chunks),
        seq_length=tokens.shape[1],
        micro_batch_size=mbs,
        forward_only=True,
        collect_non_loss_data=True,
    )
    if not ps.is_pipeline_last_stage():
        return None
    return torch.cat(outs, dim=0)
