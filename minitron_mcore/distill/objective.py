"""The distillation objective as the training engine sees it (``train.step.Objective``).

The training forward step runs teacher and student on the same micro-batch and returns the KD
loss in Megatron's per-token-loss contract, reporting ``kd loss`` (what is optimised: the KL,
plus ``ce_weight`` x the cross entropy when set) and ``lm loss`` (the student's cross entropy
with the data, for monitoring). Validation reports the same two values.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from minitron_mcore.distill.intermediate import LayerOutputs, cosine_loss_sum
from minitron_mcore.distill.losses import KDSpec, chunked_kd
from minitron_mcore.distill.pair import TeacherStudent, output_weight
from minitron_mcore.train.step import LM, Objective

KD = "kd loss"
HIDDEN = "hidden loss"


@dataclass
class HiddenLoss:
    """Intermediate hidden-state losses of the last stage (``distill.intermediate``)."""

    pairs: list  # (student layer, teacher layer)
    student_out: LayerOutputs
    teacher_out: LayerOutputs
    weight: float
    balance: bool

    def take(self):
        return self.student_out.take(), self.teacher_out.take()

    def loss_sum(self, student, outs, mask) -> torch.Tensor:
        s_out, t_out = outs
        if student.config.sequence_parallel:
            s_out = {j: _whole_sequence(x, "replicated") for j, x in s_out.items()}
            t_out = {i: _whole_sequence(x, None) for i, x in t_out.items()}
        projs = getattr(student, "kd_projection", None)
        total = sum(
            cosine_loss_sum(s_out[j], t_out[i], mask, projs[str(j)] if projs else None)
            for j, i in self.pairs
        )
        return total / len(self.pairs)


def _whole_sequence(x: torch.Tensor, grad: Optional[str]) -> torch.Tensor:
    """Under sequence parallelism each TP rank holds ``[s/tp, b, h]`` of a layer's output:
    all-gather the sequence. ``grad``: None for the teacher (no gradient); ``"replicated"``
    when every TP rank computes the same loss from the gathered tensor (the backward keeps
    this rank's part of the gradient); ``"partial"`` when each rank's loss holds only its
    vocabulary slice's share (the backward sums the ranks' gradients, then keeps this rank's
    part: a reduce-scatter, as Megatron's output layer does)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    if grad is None:
        with torch.no_grad():
            return gather_from_sequence_parallel_region(x.detach())
    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=grad == "partial")


def _kd_loss_func(
    pair: TeacherStudent,
    spec: KDSpec,
    chunk: int,
    hidden: Optional[HiddenLoss],
    batch,
    teacher_hidden,
    layer_outs,
    out,
):
    """Last stage: ``out`` [s, b, h_s] and ``teacher_hidden`` [s, b, h_t] -> loss sum (with
    sequence parallelism: [s/tp, b, h] each, gathered here)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    if pair.student.config.sequence_parallel:
        # All-gather forward; backward: reduce-scatter, summing each rank's vocabulary
        # slice's share of d loss / d hidden - what Megatron's output layer does.
        out = _whole_sequence(out, "partial")  # [s, b, h_s]
        teacher_hidden = _whole_sequence(teacher_hidden, None)  # [s, b, h_t]
    hs = out.transpose(0, 1).reshape(-1, out.shape[-1])  # [b*s, h_s], labels' order
    ht = teacher_hidden.transpose(0, 1).reshape(-1, teacher_hidden.shape[-1])
    if not pair.student.config.sequence_parallel:
        # Identity forward, all-reduce of the gradient over TP ranks backward: each rank's
        # vocabulary slice contributes its share of d loss / d hidden.
        hs = copy_to_tensor_model_parallel_region(hs)
    ws, wt = output_weight(pair.student), pair.teacher_weight
    mask = batch["loss_mask"].reshape(-1)
    kd_sum, lm_sum = chunked_kd(
        hs,
        ws,
        ht,
        wt,
        spec,
        mask,
        batch["labels"].reshape(-1),
        vocab_start=ps.get_tensor_model_parallel_rank() * ws.shape[0],
        chunk_tokens=chunk,
        group=ps.get_tensor_model_parallel_group(),
    )
    count = mask.sum().to(kd_sum.dtype)
    report = {LM: torch.stack([lm_sum.detach(), count])}
    total = kd_sum
    if hidden is not None:
        hid = hidden.loss_sum(pair.student, layer_outs, batch["loss_mask"])
        scale = kd_sum.detach() / hid.detach().clamp(min=1e-12) if hidden.balance else 1.0
        total = kd_sum + hidden.weight * scale * hid
        report[HIDDEN] = torch.stack([hid.detach().to(count.dtype), count])
    report[KD] = torch.stack([total.detach(), count])
    return total, count.to(torch.int), report


def kd_forward_step(spec: KDSpec, chunk_tokens: int, hidden: Optional[HiddenLoss] = None):
    def step(data_iterator, pair: TeacherStudent):
        batch = next(data_iterator)
        out = pair(batch["tokens"], batch["position_ids"], None)
        teacher_hidden = getattr(pair, "teacher_hidden", None)
        pair.teacher_hidden = None  # one micro-batch of teacher state at a time
        outs = hidden.take() if hidden is not None else None
        loss = partial(_kd_loss_func, pair, spec, chunk_tokens, hidden, batch, teacher_hidden, outs)
        return out, loss

    return step


def kd_objective(
    teacher, spec: KDSpec, chunk_tokens: int, hidden: Optional[HiddenLoss] = None
) -> Objective:
    """Training and validation of the student against ``teacher`` (this rank's stage)."""
    holder = {}

    def make_pair(ddp):
        holder["pair"] = TeacherStudent(ddp, teacher)
        return holder["pair"]

    def widen(recv, send):
        return holder["pair"].widen(recv, send)

    step = kd_forward_step(spec, chunk_tokens, hidden)
    return Objective(
        forward_step=step,
        eval_step=step,
        primary=KD,
        model=make_pair,
        adjust_tensor_shapes_fn=widen,
    )


def _offline_loss_func(store, spec: KDSpec, tail: bool, batch, logits):
    """Last stage: the student's logits [b, s, V/tp] against the stored teacher predictions of
    the micro-batch's samples (found by their positions in the read order)."""
    from megatron.core import parallel_state as ps

    from minitron_mcore.distill.offline import offline_kd
    from minitron_mcore.distill.topk_codec import decode
    from minitron_mcore.parallel import to_device

    info = store.info
    rows = store.rows(batch["positions"].tolist()).reshape(-1, info.row_bytes)
    ids, logp, log_tail = to_device(decode(rows, info.k, info.vocab_size, info.precision))
    b, s, part = logits.shape
    kd, lm = offline_kd(
        logits.reshape(b * s, part),
        ids,
        logp,
        log_tail,
        spec,
        tail,
        batch["labels"].reshape(-1),
        vocab_start=ps.get_tensor_model_parallel_rank() * part,
        group=ps.get_tensor_model_parallel_group(),
    )
    mask = batch["loss_mask"].reshape(-1).to(kd.dtype)
    kd_sum, count = (kd * mask).sum(), mask.sum()
    report = {
        KD: torch.stack([kd_sum.detach(), count]),
        LM: torch.stack([(lm * mask).sum(), count]),
    }
    return kd_sum, count.to(torch.int), report


def offline_kd_objective(train_store, valid_store, spec: KDSpec, tail: bool) -> Objective:
    """Training (and validation) of the student against stored teacher predictions
    (``minitron teacher-logits``): no teacher in memory."""

    def step_for(store):
        def step(data_iterator, model):
            batch = next(data_iterator)
            logits = model(batch["tokens"], batch["position_ids"], None)
            return logits, partial(_offline_loss_func, store, spec, tail, batch)

        return step

    return Objective(
        forward_step=step_for(train_store),
        eval_step=step_for(valid_store) if valid_store is not None else None,
        primary=KD,
    )
