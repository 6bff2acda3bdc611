"""Language-model loss on vocab-parallel logits (pure functions of tensors + process groups)."""

from __future__ import annotations

import torch


def vocab_columns_in_use(part: int, vocab_start: int, vocab_size: int, device) -> torch.Tensor:
    """[part] bool: which columns of the vocabulary slice ``[vocab_start, vocab_start + part)``
    are real tokens (ids < ``vocab_size``), not padding. The padding exists only so that the
    vocabulary splits evenly over TP ranks; it must never take softmax mass (here, in the KD
    losses, anywhere logits are normalised)."""
    return torch.arange(vocab_start, vocab_start + part, device=device) < vocab_size


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Set the logits of padded vocabulary entries (ids >= ``vocab_size``) to -inf.
    ``logits`` is this TP rank's slice [..., v/tp] of the padded vocabulary."""
    part = logits.shape[-1]
    first = tp_rank * part
    if first + part <= vocab_size:
        return logits
    in_use = vocab_columns_in_use(part, first, vocab_size, logits.device)
    return logits.masked_fill(~in_use, float("-inf"))


def lm_loss_per_token(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cross entropy per token, [b, s], from vocab-parallel logits [b, s, v/tp].

    Megatron's ``vocab_parallel_cross_entropy`` builds the softmax normaliser with all-reduces
    over the TP group, so no rank materialises the full-vocabulary logits.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = mask_padded_vocab(logits, vocab_size, ps.get_tensor_model_parallel_rank())
    # Megatron's kernel works in [s, b, v/tp] and needs fp32 for a stable normaliser.
    loss = vocab_parallel_cross_entropy(
        logits.transpose(0, 1).float().contiguous(), labels.t().contiguous()
    )
    return loss.t()  # [b, s]


def masked_mean(
    per_token: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of masked losses, number of tokens) - summed, not averaged, so micro-batches and
    data-parallel ranks combine exactly."""
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum(), mask.sum()
