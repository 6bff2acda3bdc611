"""Distillation from stored teacher predictions: the teacher's top-k log-probabilities and their
vocabulary ids, plus the log of the probability mass outside them, found once over
vocab-parallel teacher logits; and the KD loss of a vocab-parallel student against them, with
no teacher in memory.

Per token, ``K`` the teacher's k most likely ids, ``q`` its probabilities there, ``q_tail = 1 -
sum q`` the mass it puts elsewhere, ``s`` the student's softmax over the real vocabulary and
``s_tail = 1 - sum_K s``:

* ``tail=False`` - the online top-k loss (``KDSpec.top_k``): the teacher renormalised over
  ``K`` (at temperature ``T``: ``softmax(log q / T)``), forward KL against the student's full
  softmax, ``T^2 * sum_K q' (log q' - log s)``; gradient ``T * (s - q')`` (``q'`` 0 off ``K``).
* ``tail=True`` - the tail modelled, not dropped: KL over the ``k + 1`` outcomes ``K`` and "any
  other token", ``sum_K q (log q - log s) + q_tail (log q_tail - log s_tail)``; gradient
  ``s - q`` on ``K`` and ``s * (1 - q_tail / s_tail)`` off it (the teacher's tail mass spread
  over the other tokens in the student's own proportions). Stored at T = 1, so used at T = 1.

As in ``distill.losses`` the vocabulary sums are partial sums over this rank's slice, combined
with one all-reduce (MAX) and one all-reduce (SUM); the student's logits at the stored ids
travel in the same SUM (each id lives on one rank). The gradient is the closed form, computed
in the forward pass, so the backward needs no communication. Ties at the k-th teacher value:
the online loss keeps every tied entry, a stored top-k exactly k of them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from minitron_mcore.distill.losses import KDSpec, grad_wanted, group_all_reduce
from minitron_mcore.errors import require
from minitron_mcore.train.losses import vocab_columns_in_use


def teacher_top_k(
    zt: torch.Tensor, k: int, vocab_size: int, vocab_start: int = 0, group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's k most likely tokens over the whole (real) vocabulary, from this rank's
    logits slice ``zt`` [n, V/tp]: ``(ids [n, k] int64, logp [n, k] fp32 descending, log_tail
    [n] fp32)``, at temperature 1, the same on every rank of ``group``."""
    n, part = zt.shape
    require(0 < k <= vocab_size, f"top-k of {k} tokens from a vocabulary of {vocab_size}")
    valid = vocab_columns_in_use(part, vocab_start, vocab_size, zt.device)
    f = torch.promote_types(zt.dtype, torch.float32)
    z = zt.to(f).masked_fill(~valid, -math.inf)
    vals, idx = z.topk(min(k, part), dim=-1)
    ids = idx + vocab_start
    m = group_all_reduce(z.max(-1).values, dist.ReduceOp.MAX, group)
    s = group_all_reduce(torch.exp(z - m[:, None]).sum(-1), dist.ReduceOp.SUM, group)
    if group is not None and dist.get_world_size(group) > 1:
        size = dist.get_world_size(group)
        parts_v = [torch.empty_like(vals) for _ in range(size)]
        parts_i = [torch.empty_like(ids) for _ in range(size)]
        dist.all_gather(parts_v, vals.contiguous(), group=group)
        dist.all_gather(parts_i, ids.contiguous(), group=group)
        vals, ids = torch.cat(parts_v, -1), torch.cat(parts_i, -1)
        vals, pick = vals.topk(k, dim=-1)
        ids = ids.gather(-1, pick)
    lse = m + s.log()
    logp = vals - lse[:, None]
    # the tail from the sums (not 1 - sum q): exact where it is tiny
    rest = s - torch.exp(vals - m[:, None]).sum(-1)
    noise = s * k * torch.finfo(f).eps  # below this the "tail" is the sums' rounding
    log_tail = torch.where(rest > noise, rest, 0.0).log() - s.log()
    return ids, logp.float(), log_tail.float()


def offline_kd_local(
    zs: torch.Tensor,
    ids: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor,
    spec: KDSpec,
    tail: bool = False,
    labels: Optional[torch.Tensor] = None,
    vocab_start: int = 0,
    group=None,
    need_grad: bool = True,
):
    """Per-token losses against stored top-k teacher predictions, and the gradient w.r.t. this
    rank's student logits ``zs`` [n, V/tp]. ``ids`` [n, k] global ids, ``logp`` [n, k] the
    teacher's log-probabilities at T = 1, ``log_tail`` [n]. Returns ``(kd [n], lm [n] or None,
    grad [n, V/tp] or None)`` as :func:`distill.losses.kd_local` (``spec.top_k`` is not read:
    k is the stored one)."""
    require(spec.mode == "forward", "stored teacher predictions support distill.mode=forward")
    T = 1.0 if tail else spec.temperature
    require(not tail or spec.temperature == 1.0, "the tail term is defined at temperature 1")
    n, part = zs.shape
    valid = vocab_columns_in_use(part, vocab_start, spec.vocab_size, zs.device)
    f = torch.promote_types(zs.dtype, torch.float32)
    z = zs.to(f)
    ss = (z / T if T != 1.0 else z).masked_fill(~valid, -math.inf)
    local = ids - vocab_start
    mine = (local >= 0) & (local < part)
    at = local.clamp(0, part - 1)
    picked_k = torch.where(mine, ss.gather(-1, at), 0.0)  # [n, k]
    m = [ss.max(-1).values]
    want_lm = labels is not None
    separate_lm = want_lm and T != 1.0
    if separate_lm:
        z1 = z.masked_fill(~valid, -math.inf)
        m.append(z1.max(-1).values)
    m = group_all_reduce(torch.stack(m), dist.ReduceOp.MAX, group)
    es = torch.exp(ss - m[0, :, None])
    cols = [es.sum(-1)]
    if tail:  # the student's mass off the stored ids
        # (added, not written: ids of other ranks' slices are clamped onto columns 0 / end)
        in_k = torch.zeros_like(es).scatter_add_(-1, at, mine.to(es.dtype)) > 0
        cols.append(torch.where(in_k, 0.0, es).sum(-1))
    if want_lm:
        lab = labels - vocab_start
        lab_mine = (lab >= 0) & (lab < part)
        e1 = torch.exp(z1 - m[1, :, None]) if separate_lm else es
        cols.append(e1.sum(-1) if separate_lm else cols[0])
        cols.append(torch.where(lab_mine, z.gather(-1, lab.clamp(0, part - 1)[:, None])[:, 0], 0.0))
    ncol = len(cols)
    sums = group_all_reduce(
        torch.cat([torch.stack(cols, -1), picked_k], -1), dist.ReduceOp.SUM, group
    )
    lse_s = m[0] + sums[:, 0].log()
    log_s_k = sums[:, ncol:] - lse_s[:, None]  # [n, k] student log-probs at the stored ids
    if tail:
        q = logp.to(f).exp()
        q_t = log_tail.to(f).exp()
        # (floored: a student with no mass off the stored ids - every real id stored - would
        # make a teacher's rounding-level tail an infinite loss)
        log_s_t = m[0] + sums[:, 1].clamp(min=torch.finfo(f).tiny).log() - lse_s
        tail_term = torch.where(q_t > 0, q_t * (log_tail.to(f) - log_s_t), 0.0)
        kd = (q * (logp.to(f) - log_s_k)).sum(-1) + tail_term
    else:
        q = torch.softmax(logp.to(f) / T, dim=-1)
        kd = (T * T) * (q * (q.clamp(min=1e-30).log() - log_s_k)).sum(-1)
    lm = None
    if want_lm:
        k_lse = (m[1] if separate_lm else m[0]) + sums[:, ncol - 2].log()
        lm = k_lse - sums[:, ncol - 1]
        if spec.ce_weight:
            kd = kd + spec.ce_weight * lm
    elif spec.ce_weight:
        raise ValueError("ce_weight > 0 needs labels")
    grad = None
    if need_grad:
        ps = es.div(sums[:, 0:1])
        if tail:  # off the stored ids: s * (1 - q_tail / s_tail); on them: s - q
            r = torch.exp(log_tail.to(f) - log_s_t).nan_to_num(0.0)[:, None]
            grad = ps * (1 - r)
            fix = torch.where(mine, log_s_k.exp() * r - q, 0.0)
            grad.scatter_add_(-1, at, fix)
        else:
            grad = ps.sub_(torch.zeros_like(ps).scatter_add_(-1, at, torch.where(mine, q, 0.0)))
            grad.mul_(T)
        if spec.ce_weight:
            p1 = e1.div(sums[:, ncol - 2 : ncol - 1]) if separate_lm else es.div(sums[:, 0:1])
            grad.add_(p1, alpha=spec.ce_weight)
            rows = torch.nonzero(lab_mine).squeeze(-1)
            grad[rows, lab[rows]] -= spec.ce_weight
    return kd, lm, grad


class _OfflineKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, ids, logp, log_tail, labels, spec, tail, vocab_start, group, need):
        kd, lm, grad = offline_kd_local(
            zs, ids, logp, log_tail, spec, tail, labels, vocab_start, group, need
        )
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.zs_dtype = zs.dtype
        if lm is None:
            lm = torch.full_like(kd, math.nan)
        ctx.mark_non_differentiable(lm)
        return kd, lm

    @staticmethod
    def backward(ctx, g_kd, g_lm):
        (grad,) = ctx.saved_tensors
        return (grad * g_kd[:, None].to(grad.dtype)).to(ctx.zs_dtype), *([None] * 9)


def offline_kd(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor,
    spec: KDSpec,
    tail: bool = False,
    labels: Optional[torch.Tensor] = None,
    vocab_start: int = 0,
    group=None,
):
    """Per-token KD loss (and the student's LM loss, NaN without labels) from vocab-parallel
    student logits [..., V/tp] and stored teacher predictions ``ids`` / ``logp`` [..., k],
    ``log_tail`` [...]. Differentiable w.r.t. ``student_logits``."""
    lead = student_logits.shape[:-1]
    k = ids.shape[-1]
    kd, lm = _OfflineKD.apply(
        student_logits.reshape(-1, student_logits.shape[-1]),
        ids.reshape(-1, k),
        logp.reshape(-1, k),
        log_tail.reshape(-1),
        None if labels is None else labels.reshape(-1),
        spec,
        tail,
        vocab_start,
        group,
        grad_wanted(student_logits),
    )
    return kd.reshape(lead), lm.reshape(lead)
