"""Plain-PyTorch full-vocabulary KD losses: the reference the vocab-parallel ones are tested
against (and the naive baseline of benchmarks/bench_distill.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_kd(zs, zt, spec, labels=None):
    """Per-token loss from full-vocabulary logits [n, V_padded] with autograd."""
    v = spec.vocab_size
    T = spec.temperature
    zs, zt = zs[..., :v].float(), zt[..., :v].float()
    log_ps = F.log_softmax(zs / T, dim=-1)
    t = zt / T
    if spec.top_k:
        kth = zt.topk(spec.top_k, dim=-1).values[..., -1:]
        t = t.masked_fill(zt < kth, float("-inf"))
    log_pt = F.log_softmax(t, dim=-1)
    pt = log_pt.exp()
    if spec.mode == "forward":
        kl = torch.where(pt > 0, pt * (log_pt - log_ps), 0.0).sum(-1)
    else:
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    loss = T * T * kl
    lm = None
    if labels is not None:
        lm = F.cross_entropy(zs, labels, reduction="none")
        loss = loss + spec.ce_weight * lm
    return loss, lm
