"""Knowledge-distillation losses on vocab-parallel logits: pure functions of tensors and a
process group (Minitron, arXiv 2407.14679 sec. 2.4 and 2408.11796 sec. 3: logit-only forward KL
at temperature 1 recovers the pruned student best).

Every function sees this tensor-parallel rank's slice of the (padded) vocabulary, columns
``[vocab_start, vocab_start + V/tp)``; no rank ever holds full-vocabulary logits. With
``z`` the logits, ``T`` the temperature, ``p = softmax(z / T)`` over the real vocabulary (padded
entries excluded), per token:

* forward KL   ``T^2 * KL(p_t || p_s) = T^2 * sum_v p_t (log p_t - log p_s)``
  gradient     ``d/dz_s = T * (p_s - p_t)``
* reverse KL   ``T^2 * KL(p_s || p_t)``
  gradient     ``d/dz_s = T * p_s * (log p_s - log p_t - KL)``
* top-k        forward KL against the teacher restricted to its ``k`` largest logits over the
  whole vocabulary (found across TP ranks) and renormalised there (ties at the k-th value are
  all kept);
* CE mix       ``+ ce_weight * (logsumexp(z_s) - z_s[label])`` at temperature 1, gradient
  ``ce_weight * (softmax(z_s) - onehot(label))``.

The vocabulary sums are built from local partial sums: one all-reduce (MAX) of the per-token
maxima and one all-reduce (SUM) of the per-token partial sums, so every rank ends with the same
per-token loss. The gradient is the closed form above, computed in the forward pass (the
softmaxes are needed there anyway), so the backward pass needs no communication: the same
layout as Megatron's ``vocab_parallel_cross_entropy``. No library offers a vocab-parallel KL
(Megatron-Core has cross entropy only), so it is written here.

Two entry points share :func:`kd_local`:

* :func:`vocab_parallel_kd` - on logits ``[n, V/tp]`` (autograd-aware; the reference layout);
* :func:`chunked_kd` - on the final hidden states and the output-layer weights of both models:
  the logits are made, used and dropped one chunk of ``chunk_tokens`` tokens at a time, so the
  fp32 softmax buffers (and the logits) of the two models never exist for the whole
  micro-batch; gradients w.r.t. the student's hidden states and output weight are accumulated
  chunk by chunk (the "fused linear + loss" layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from minitron_mcore.errors import BadValue, require
from minitron_mcore.train.losses import vocab_columns_in_use

MODES = ("forward", "reverse")


@dataclass(frozen=True)
class KDSpec:
    """What the loss computes (``distill.*`` keys map onto it)."""

    vocab_size: int
    """Real (unpadded) vocabulary; columns at or beyond it are padding and excluded."""
    temperature: float = 1.0
    mode: str = "forward"
    """forward: KL(teacher || student) (the papers'); reverse: KL(student || teacher)."""
    top_k: int = 0
    """> 0: only the teacher's k most likely tokens (global over TP ranks)."""
    ce_weight: float = 0.0
    """Weight of the student's cross entropy with the data labels, added to the KD loss."""

    def __post_init__(self):  # the ``distill.*`` keys' checks, in one place
        for ok, message in (
            (self.mode in MODES, f"distill.mode={self.mode!r}: use one of {MODES}"),
            (self.temperature > 0, "distill.temperature must be positive"),
            (self.top_k >= 0 and self.ce_weight >= 0, "distill.top_k / ce_weight must be >= 0"),
            (
                not (self.top_k and self.mode != "forward"),
                "distill.top_k works with distill.mode=forward only",
            ),
        ):
            require(ok, message, BadValue)


def group_all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    """``t`` all-reduced in place over ``group`` (nothing to do for a group of one)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _top_k_threshold(zt: torch.Tensor, k: int, valid: torch.Tensor, group) -> torch.Tensor:
    """Per token, the k-th largest teacher logit over the whole vocabulary: [n, 1]."""
    local = zt.masked_fill(~valid, -math.inf)
    kk = min(k, local.shape[-1])
    vals = local.topk(kk, dim=-1).values  # [n, kk]
    if group is not None and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(vals) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, vals.contiguous(), group=group)
        vals = torch.cat(parts, dim=-1)  # [n, kk * tp]
    return vals.topk(min(k, vals.shape[-1]), dim=-1).values[:, -1:]


def kd_local(
    zs: torch.Tensor,
    zt: torch.Tensor,
    labels: Optional[torch.Tensor],
    spec: KDSpec,
    vocab_start: int,
    group=None,
    need_grad: bool = True,
):
    """Per-token losses of one set of tokens, and the gradient w.r.t. the student logits.

    ``zs``, ``zt``: [n, V/tp] student / teacher logits (any float dtype; computed in fp32);
    ``labels``: [n] global token ids (needed when ``spec.ce_weight`` > 0 or for ``lm``).
    Returns ``(kd [n], lm [n] or None, grad [n, V/tp] or None)``: ``kd`` already includes the
    CE mix and the T^2 factor; ``lm`` is the student's plain cross entropy (T = 1), for
    monitoring; ``grad`` is d(kd)/d(zs) per token (fp32)."""
    n, part = zs.shape
    valid = vocab_columns_in_use(part, vocab_start, spec.vocab_size, zs.device)
    T = spec.temperature
    f = torch.promote_types(zs.dtype, torch.float32)  # fp32 for bf16/fp32 input, fp64 kept
    zs, zt = zs.to(f), zt.to(f)
    # Every pass over [n, V/tp] fp32 costs memory traffic, so the no-op ones are skipped: the
    # division when T = 1, the padding fill on ranks whose slice has no padded column, the
    # "kept" selection when every teacher entry is kept. Inputs are never written to.
    padded = vocab_start + part > spec.vocab_size

    def scaled(z):
        out = z / T if T != 1.0 else z
        if padded:
            out = (
                out.masked_fill_(~valid, -math.inf)
                if T != 1.0
                else out.masked_fill(~valid, -math.inf)
            )
        return out

    ss, st = scaled(zs), scaled(zt)  # [n, V/tp]
    if spec.top_k:
        st = st.masked_fill(zt < _top_k_threshold(zt, spec.top_k, valid, group), -math.inf)
    kept = torch.isfinite(st) if (padded or spec.top_k) else None  # where log p_t is defined
    # Global maxima (the softmax shifts), then partial sums: one collective each.
    m = torch.stack([ss.max(-1).values, st.max(-1).values])  # [2, n]
    want_lm = labels is not None
    separate_lm = want_lm and T != 1.0
    if separate_lm:
        z1 = zs.masked_fill(~valid, -math.inf)
        m = torch.cat([m, z1.max(-1).values[None]])
    m = group_all_reduce(m, dist.ReduceOp.MAX, group)
    es = torch.exp(ss - m[0, :, None])  # 0 at padded entries
    et = torch.exp(st - m[1, :, None])  # 0 at padded / cut entries
    diff = st - ss if kept is None else torch.where(kept, st - ss, 0.0)  # finite log-ratios
    sums = [es.sum(-1), et.sum(-1), (et * diff).sum(-1)]
    if spec.mode == "reverse":
        sums.append(-(es * diff).sum(-1))
    if want_lm:
        local = labels - vocab_start
        mine = (local >= 0) & (local < part)
        picked = zs.gather(-1, local.clamp(0, part - 1)[:, None])[:, 0]
        e1 = torch.exp(z1 - m[2, :, None]) if separate_lm else es
        sums += [e1.sum(-1) if separate_lm else sums[0], torch.where(mine, picked, 0.0)]
    s = group_all_reduce(torch.stack(sums), dist.ReduceOp.SUM, group)
    lse_s, lse_t = m[0] + s[0].log(), m[1] + s[1].log()
    if spec.mode == "forward":
        kl = s[2] / s[1] - lse_t + lse_s  # sum p_t (log p_t - log p_s)
    else:
        kl = s[3] / s[0] - lse_s + lse_t  # sum p_s (log p_s - log p_t)
    kd = (T * T) * kl
    lm = None
    if want_lm:
        k = 4 if spec.mode == "reverse" else 3
        lm = (m[2] if separate_lm else m[0]) + s[k].log() - s[k + 1]
        if spec.ce_weight:
            kd = kd + spec.ce_weight * lm
    elif spec.ce_weight:
        raise ValueError("ce_weight > 0 needs labels")
    grad = None
    if need_grad:
        ps = es.div_(s[0][:, None])  # es is not needed any more: reuse its memory
        if spec.mode == "forward":
            grad = (ps - et.div_(s[1][:, None])).mul_(T)
        else:
            logratio = diff.neg_().add_((lse_t - lse_s)[:, None])  # log p_s - log p_t
            grad = ps * logratio.sub_(kl[:, None]).mul_(T)
        if spec.ce_weight:
            p1 = e1.div(s[k][:, None]) if separate_lm else ps
            grad.add_(p1, alpha=spec.ce_weight)
            rows = torch.nonzero(mine).squeeze(-1)
            grad[rows, local[rows]] -= spec.ce_weight
    return kd, lm, grad


def grad_wanted(*tensors: torch.Tensor) -> bool:
    """Will backward run through these inputs? Decided by the caller's grad mode, not only by
    ``requires_grad``: under ``torch.no_grad()`` (validation) the student's weights still
    require grad, and inside ``Function.forward`` both the grad mode (always off there) and
    ``ctx.needs_input_grad`` (set from ``requires_grad`` alone) would say yes - each validation
    chunk would then run two extra GEMMs and fill fp32 gradient buffers nobody reads."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, labels, spec, vocab_start, group, need_grad):
        kd, lm, grad = kd_local(zs, zt, labels, spec, vocab_start, group, need_grad)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.zs_dtype = zs.dtype
        if lm is None:
            lm = torch.full_like(kd, math.nan)
        ctx.mark_non_differentiable(lm)
        return kd, lm

    @staticmethod
    def backward(ctx, g_kd, g_lm):
        (grad,) = ctx.saved_tensors
        return (grad * g_kd[:, None].to(grad.dtype)).to(ctx.zs_dtype), *([None] * 6)


def vocab_parallel_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    spec: KDSpec,
    labels: Optional[torch.Tensor] = None,
    vocab_start: int = 0,
    group=None,
):
    """Per-token KD loss (and the student's LM loss) from vocab-parallel logits.

    ``student_logits``, ``teacher_logits``: [..., V/tp] (this rank's vocabulary slice; the
    teacher's carries no gradient); ``labels``: [...] token ids. Returns ``(kd [...],
    lm [...])``; ``lm`` is NaN without labels. Differentiable w.r.t. ``student_logits``."""
    lead = student_logits.shape[:-1]
    zs = student_logits.reshape(-1, student_logits.shape[-1])
    zt = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    lab = None if labels is None else labels.reshape(-1)
    need = grad_wanted(student_logits)
    kd, lm = _VocabParallelKD.apply(zs, zt, lab, spec, vocab_start, group, need)
    return kd.reshape(lead), lm.reshape(lead)


class _ChunkedKD(torch.autograd.Function):
    """Loss sum over tokens from hidden states; see :func:`chunked_kd`."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, labels, mask, spec, vocab_start, chunk, group, need):
        n = hs.shape[0]
        f = torch.promote_types(hs.dtype, torch.float32)
        grad_h = torch.zeros_like(hs, dtype=f) if need else None
        grad_w = torch.zeros_like(ws, dtype=f) if need else None
        kd_sum = hs.new_zeros((), dtype=f)
        lm_sum = hs.new_zeros((), dtype=f)
        # The two gradient matmuls run in the models' dtype (bf16 on bf16 models, as Megatron's
        # output-layer backward), their sums accumulate in fp32.
        md = torch.promote_types(hs.dtype, ws.dtype)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            zs = hs[a:b] @ ws.t()  # [c, V/tp]
            zt = ht[a:b] @ wt.t()
            lab = None if labels is None else labels[a:b]
            kd, lm, g = kd_local(zs, zt, lab, spec, vocab_start, group, need)
            w = mask[a:b].to(f)
            kd_sum += (kd * w).sum()
            if lm is not None:
                lm_sum += (lm * w).sum()
            if need:
                g = (g * w[:, None]).to(md)  # [c, V/tp]
                grad_h[a:b] = g @ ws.to(md)
                grad_w += g.t() @ hs[a:b].to(md)
            del zs, zt, g
        ctx.save_for_backward(
            grad_h if need else torch.empty(0), grad_w if need else torch.empty(0)
        )
        ctx.dtypes = (hs.dtype, ws.dtype)
        ctx.mark_non_differentiable(lm_sum)
        return kd_sum, lm_sum

    @staticmethod
    def backward(ctx, g_kd, g_lm):
        grad_h, grad_w = ctx.saved_tensors
        return (
            (grad_h * g_kd).to(ctx.dtypes[0]),
            (grad_w * g_kd).to(ctx.dtypes[1]),
            *([None] * 9),
        )


def chunked_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    spec: KDSpec,
    loss_mask: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    vocab_start: int = 0,
    chunk_tokens: int = 1024,
    group=None,
):
    """Masked sums of the KD loss and the student's LM loss, from final hidden states.

    ``student_hidden`` [n, h_s] and ``teacher_hidden`` [n, h_t] (the inputs of the output
    layers); ``*_weight`` [V/tp, h] (this rank's output-layer rows); ``loss_mask`` [n].
    Equals ``vocab_parallel_kd(hs @ ws.T, ht @ wt.T, ...)`` summed under the mask, with
    gradients w.r.t. ``student_hidden`` (this rank's vocabulary share: the caller sums them
    over TP ranks, e.g. through ``copy_to_tensor_model_parallel_region``) and
    ``student_weight``. Returns ``(kd_sum, lm_sum)`` (0-dim fp32; ``lm_sum`` is 0 without
    labels and carries no gradient)."""
    return _ChunkedKD.apply(
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        labels,
        loss_mask,
        spec,
        vocab_start,
        max(1, int(chunk_tokens)),
        group,
        grad_wanted(student_hidden, student_weight),
    )
