"""Teacher and student run together, stage by stage, in one Megatron pipeline schedule.

Both models are split over the same tensor- and pipeline-parallel layout (each of any width and
depth: stage ``i`` holds ``L_s/pp`` student layers and ``L_t/pp`` teacher layers). Between
stages the teacher's activations travel with the student's: the schedule's tensors are widened
from ``[s, b, h_s]`` to ``[s, b, h_s + h_t]`` (Megatron 0.16's ``adjust_tensor_shapes_fn``, the
approach Model Optimizer takes), :meth:`TeacherStudent.set_input_tensor` splits what arrives,
and each non-last stage sends ``cat([student_out, teacher_out], -1)``. Only the student part
carries a gradient; the teacher runs in eval mode under ``no_grad``.

On the last stage both models stop before their output layers (:func:`final_hidden_states`):
the KD loss (``distill.losses.chunked_kd``) makes the vocab-parallel logits of both, chunk by
chunk, so neither model's ``[tokens, V/tp]`` logits ever exist for a whole micro-batch.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def final_hidden_states(gpt):
    """While active, a last-stage ``GPTModel`` returns its final-normed hidden states
    ``[s, b, h]`` instead of logits. GPTModel returns before its output layer when
    ``post_process`` is off (the final norm belongs to the decoder and still runs); the flag
    is restored at once, so grad finalisation and checkpointing see the model unchanged."""
    was = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = was


def output_weight(gpt) -> torch.Tensor:
    """The last stage's output-layer weight ``[V/tp, h]`` (the embedding when tied)."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@torch.no_grad()
def aligned_teacher_weight(student, teacher) -> torch.Tensor:
    """The teacher's output-layer rows for the token ids of this rank's slice of the student's
    vocabulary, ``[V_s/tp, h_t]``.

    One tokenizer may come with differently padded output layers (Qwen2.5-Coder-7B has 152064
    rows, the 0.5B 151936): with TP the two models' vocabulary slices then start at different
    ids. The frozen teacher's rows are gathered over the TP group once and cut to the student's
    slice; ids past the teacher's rows get zero rows (they are past the tokenizer too, and the
    loss masks them). With equal padding this is the teacher's own slice, no copy."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ws, wt = output_weight(student), output_weight(teacher)
    if ws.shape[0] == wt.shape[0]:
        return wt
    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(wt) for _ in range(tp)]
    if tp > 1:
        dist.all_gather(parts, wt.contiguous(), group=group)
    else:
        parts = [wt]
    full = torch.cat(parts)  # [V_t, h_t], transient
    start = ps.get_tensor_model_parallel_rank() * ws.shape[0]
    out = wt.new_zeros(ws.shape[0], wt.shape[1])
    rows = full[start : start + ws.shape[0]]
    out[: rows.shape[0]] = rows
    return out


class TeacherStudent:
    """What Megatron's schedules and grad finalisation see during distillation.

    ``module`` is the DDP-wrapped student (Megatron's helpers find the student's attributes by
    following ``.module``); DDP's own methods (``finish_grad_sync``, ``no_sync``,
    ``zero_grad_buffer`` ...) are reached through attribute fallback. The teacher is held
    outside it: DDP, the optimizer and checkpoints never see it."""

    def __init__(self, student_ddp, teacher):
        from megatron.core import parallel_state as ps

        self.module = student_ddp
        self.teacher = teacher
        self.student = student_ddp.module
        self.h_s = self.student.config.hidden_size
        self.h_t = teacher.config.hidden_size
        self.last_stage = ps.is_pipeline_last_stage()
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        # the teacher's output rows for the student's vocabulary slice (frozen: made once)
        self.teacher_weight = (
            aligned_teacher_weight(self.student, teacher) if self.last_stage else None
        )

    def __getattr__(self, name):
        if name == "module":  # not set yet: avoid recursing through __getattr__
            raise AttributeError(name)
        return getattr(self.module, name)

    def __call__(self, tokens, position_ids, attention_mask):
        """Non-last stage: ``[s, b, h_s + h_t]`` to send on. Last stage: the student's final
        hidden states ``[s, b, h_s]``; the teacher's are kept in ``teacher_hidden``."""
        student_ctx = final_hidden_states(self.student) if self.last_stage else _null()
        teacher_ctx = final_hidden_states(self.teacher) if self.last_stage else _null()
        with torch.no_grad(), teacher_ctx:
            t_out = self.teacher(tokens, position_ids, attention_mask)
        with student_ctx:
            s_out = self.module(tokens, position_ids, attention_mask)
        if self.last_stage:
            self.teacher_hidden = t_out
            return s_out
        return torch.cat([s_out, t_out.to(s_out.dtype)], dim=-1)

    def set_input_tensor(self, tensors) -> None:
        """Split what the previous stage sent: ``[..., :h_s]`` student, ``[..., h_s:]``
        teacher (``None`` on the first stage)."""
        x = tensors[0] if isinstance(tensors, (list, tuple)) else tensors
        s_in = t_in = None
        if x is not None:
            s_in = x[..., : self.h_s].contiguous()
            t_in = x[..., self.h_s :].detach().to(self.teacher.config.params_dtype).contiguous()
        self.student.set_input_tensor([s_in])
        self.teacher.set_input_tensor([t_in])

    def widen(self, recv_shapes: list, send_shapes: list):
        """``adjust_tensor_shapes_fn`` for the 1F1B schedule: add the teacher's hidden size."""

        def wide(shapes):
            return [(*s[:-1], s[-1] + self.h_t) for s in shapes]

        return wide(recv_shapes), wide(send_shapes)


@contextlib.contextmanager
def _null():
    yield
