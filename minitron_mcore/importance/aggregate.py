"""Pure aggregation of activations into importance scores (tensors in, tensors out).

Per the Minitron paper, absolute activations are reduced over the sequence (mean or L2) for each
sample, then over the batch (mean, L2 or variance). Batch reductions are streamed: we keep the
count, sum and sum of squares of the per-sample values for both sequence reductions, so every
one of the six combinations can be read out afterwards, and partial statistics from several
batches or data-parallel ranks combine by addition.
"""

from __future__ import annotations

import torch

SEQ_AGGS = ("mean", "l2")
BATCH_AGGS = ("mean", "l2", "var")
DEFAULT_AGG = ("mean", "l2")  # (sequence, batch): the papers' best


def seq_reduce(act: torch.Tensor) -> dict[str, torch.Tensor]:
    """[s, b, c] non-negative activations -> {seq_agg: [b, c]}."""
    act = act.float()
    return {"mean": act.mean(dim=0), "l2": act.norm(dim=0)}


def head_norms(attn_out: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Attention output (input of ``linear_proj``) [s, b, heads*d] -> per-head L2 over the head
    dimension [s, b, heads]."""
    s, b, _ = attn_out.shape
    return attn_out.float().reshape(s, b, num_heads, -1).norm(dim=-1)


class Accumulator:
    """Streaming per-channel statistics of per-sample sequence reductions."""

    def __init__(self):
        self.stats: dict[str, torch.Tensor] = {}

    def add(self, act: torch.Tensor) -> None:
        """``act``: [s, b, c], already non-negative (|x| or a norm)."""
        for name, v in seq_reduce(act).items():  # v: [b, c]
            upd = {f"{name}.sum": v.sum(0), f"{name}.sumsq": (v * v).sum(0)}
            for k, t in upd.items():
                self.stats[k] = self.stats[k] + t if k in self.stats else t
        n = torch.tensor(float(act.shape[1]), device=act.device)
        self.stats["count"] = self.stats.get("count", torch.zeros((), device=act.device)) + n

    def flat(self) -> torch.Tensor:
        """All statistics in one flat tensor (for one all-reduce)."""
        return torch.cat([self.stats[k].reshape(-1) for k in sorted(self.stats)])

    def load_flat(self, flat: torch.Tensor) -> None:
        off = 0
        for k in sorted(self.stats):
            n = self.stats[k].numel()
            self.stats[k] = flat[off : off + n].reshape(self.stats[k].shape)
            off += n


def finalize(stats: dict[str, torch.Tensor], seq_agg: str, batch_agg: str) -> torch.Tensor:
    """Per-channel score for one (sequence, batch) aggregation choice."""
    n = stats["count"].clamp(min=1)
    total, sumsq = stats[f"{seq_agg}.sum"], stats[f"{seq_agg}.sumsq"]
    if batch_agg == "mean":
        return total / n
    if batch_agg == "l2":
        return sumsq.sqrt()
    if batch_agg == "var":
        return (sumsq / n - (total / n) ** 2).clamp(min=0)
    raise ValueError(batch_agg)


def all_scores(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"<seq>-<batch>": score} for every aggregation choice."""
    return {f"{s}-{b}": finalize(stats, s, b) for s in SEQ_AGGS for b in BATCH_AGGS}


def group_scores(head_scores: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Query-group score = L2 over the scores of the group's heads. [heads] -> [groups]."""
    return head_scores.reshape(num_groups, -1).norm(dim=-1)


def block_importance(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Per-token 1 - cos(x_in, x_out) over the hidden dim, summed: ([s, b, h]) -> (sum, count).
    Block importance (ShortGPT / Minitron depth pruning): layers that barely change their input
    matter least."""
    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
    return (1.0 - cos).sum(), torch.tensor(float(cos.numel()), device=cos.device)


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, ties to the lower index, returned ascending (how
    pruning keeps channels, heads, neurons and experts: deterministic, in original order)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])
