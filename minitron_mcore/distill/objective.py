"""The distillation objective as the training engine sees it (``train.step.Objective``).

The training forward step runs teacher and student on the same micro-batch and returns the KD
loss in Megatron's per-token-loss contract, reporting ``kd loss`` (what is optimised: the KL,
plus ``ce_weight`` x the cross entropy when set) and ``lm loss`` (the student's cross entropy
with the data, for monitoring). Validation reports the same two values.
"""

from __future__ import annotations

from functools import partial

import torch

from minitron_mcore.distill.losses import KDSpec, chunked_kd
from minitron_mcore.distill.pair import TeacherStudent, output_weight
from minitron_mcore.train.step import LM, Objective

KD = "kd loss"


def _kd_loss_func(pair: TeacherStudent, spec: KDSpec, chunk: int, batch, teacher_hidden, out):
    """Last stage: ``out`` [s, b, h_s] and ``teacher_hidden`` [s, b, h_t] -> loss sum."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    hs = out.transpose(0, 1).reshape(-1, out.shape[-1])  # [b*s, h_s], labels' order
    ht = teacher_hidden.transpose(0, 1).reshape(-1, teacher_hidden.shape[-1])
    # Identity forward, all-reduce of the gradient over TP ranks backward: each rank's
    # vocabulary slice contributes its share of d loss / d hidden.
    hs = copy_to_tensor_model_parallel_region(hs)
    ws, wt = output_weight(pair.student), output_weight(pair.teacher)
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
    report = {
        KD: torch.stack([kd_sum.detach(), count]),
        LM: torch.stack([lm_sum.detach(), count]),
    }
    return kd_sum, count.to(torch.int), report


def kd_forward_step(spec: KDSpec, chunk_tokens: int):
    def step(data_iterator, pair: TeacherStudent):
        batch = next(data_iterator)
        out = pair(batch["tokens"], batch["position_ids"], None)
        teacher_hidden = getattr(pair, "teacher_hidden", None)
        pair.teacher_hidden = None  # one micro-batch of teacher state at a time
        return out, partial(_kd_loss_func, pair, spec, chunk_tokens, batch, teacher_hidden)

    return step


def kd_objective(teacher, spec: KDSpec, chunk_tokens: int) -> Objective:
    """Training and validation of the student against ``teacher`` (this rank's stage)."""
    holder = {}

    def make_pair(ddp):
        holder["pair"] = TeacherStudent(ddp, teacher)
        return holder["pair"]

    def widen(recv, send):
        return holder["pair"].widen(recv, send)

    step = kd_forward_step(spec, chunk_tokens)
    return Objective(
        forward_step=step,
        eval_step=step,
        primary=KD,
        model=make_pair,
        adjust_tensor_shapes_fn=widen,
    )
