"""Intermediate hidden-state losses: student layer outputs matched to teacher layer outputs.

For each pair (student layer ``j``, teacher layer ``i``) the per-token loss is the cosine
distance ``1 - cos(P h_s, h_t)`` between the layers' outputs (``P``: a learned projection
``h_s -> h_t`` when the widths differ, else the identity), summed over unmasked tokens and
averaged over the pairs (Minitron, arXiv 2407.14679 sec. 2.4 found logit-only KD enough for
its students, so this is off by default: ``distill.intermediate_weight=0``).

* Layer map: a student pruned from this teacher maps its layer ``j`` to the teacher layer it
  was cut from (the prune plan's ``kept_layers``); any other student maps proportionally
  (``j -> round((j + 1) * L_t / L_s) - 1``).
* Projection: one ``Linear(h_s, h_t)`` per pair, trained with the student. When the student was
  width-pruned from the teacher it starts as the channel selection of the prune plan (student
  channel ``c`` -> teacher channel ``hidden[c]``), so training starts from the pruned mapping.
  The projections are a training-only submodule of the student (``kd_projection``): DDP, the
  optimizer and resume handle them like any weight; they ride along in the checkpoint and are
  ignored by export-hf, prune and evaluate, which read the model's own tensors only.
* Pipeline parallelism: the pairs must lie on the last stage (where the loss is computed), as
  in Model Optimizer.
* Balancing: with ``distill.intermediate_balance`` the hidden-state loss is rescaled to the
  logit loss's magnitude before weighting (``w * L_hid * sg(L_kd / L_hid)``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from minitron_mcore.errors import require


def layer_pairs(
    num_student: int, num_teacher: int, prune_plan: Optional[dict], layers: list
) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for the chosen student layers."""
    kept = (prune_plan or {}).get("kept_layers")
    for j in layers:
        require(0 <= j < num_student, f"distill.intermediate_layers: no student layer {j}")

    def teacher_of(j: int) -> int:
        if kept and len(kept) == num_student:
            return int(kept[j])
        return round((j + 1) * num_teacher / num_student) - 1

    return [(int(j), teacher_of(int(j))) for j in layers]


def local_layers(gpt) -> dict[int, torch.nn.Module]:
    """This stage's layers by global index."""
    return {layer.layer_number - 1: layer for layer in gpt.decoder.layers}


def check_on_stage(pairs, student, teacher) -> None:
    s_local, t_local = local_layers(student), local_layers(teacher)
    for j, i in pairs:
        require(
            j in s_local and i in t_local,
            f"hidden-state loss pair (student layer {j}, teacher layer {i}) is not on the last "
            f"pipeline stage (it holds student layers {sorted(s_local)} and teacher layers "
            f"{sorted(t_local)}); with pipeline parallelism choose distill.intermediate_layers "
            "from the last stage",
        )


def attach_projections(student, pairs, h_s: int, h_t: int, hidden_kept: Optional[list]):
    """Add ``student.kd_projection`` (one projection per pair) when the widths differ."""
    if h_s == h_t:
        return
    projs = torch.nn.ModuleDict()
    ref = next(student.parameters())  # the projections live with the student's weights
    for j, _ in pairs:
        p = torch.nn.Linear(h_s, h_t, bias=False, dtype=ref.dtype, device=ref.device)
        if hidden_kept is not None and len(hidden_kept) == h_s:
            with torch.no_grad():
                p.weight.zero_()
                rows = torch.as_tensor(hidden_kept, device=ref.device)
                p.weight[rows, torch.arange(h_s, device=ref.device)] = 1.0
        projs[str(j)] = p
    student.kd_projection = projs


class LayerOutputs:
    """Forward hooks keeping the outputs ``[s, b, h]`` of chosen layers, per forward pass."""

    def __init__(self, layers: dict[int, torch.nn.Module], keep: list[int]):
        self.out: dict[int, torch.Tensor] = {}
        self.handles = [
            layers[i].register_forward_hook(lambda m, a, o, i=i: self._keep(i, o)) for i in keep
        ]

    def _keep(self, i, output):
        self.out[i] = output[0] if isinstance(output, tuple) else output

    def take(self) -> dict[int, torch.Tensor]:
        out, self.out = self.out, {}
        return out


def cosine_loss_sum(
    h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor, proj=None
) -> torch.Tensor:
    """Sum over unmasked tokens of ``1 - cos(P h_s, h_t)``; ``h_*`` [s, b, h], ``mask`` [b, s]."""
    x = proj(h_s) if proj is not None else h_s
    cos = F.cosine_similarity(x.float(), h_t.detach().float(), dim=-1, eps=1e-8)  # [s, b]
    return ((1.0 - cos) * mask.t().to(cos.dtype)).sum()
