"""Structured slicing of Megatron GPT tensors: pure functions of weights + kept indices.

Tensors are the canonical (global, unsharded) Megatron layouts of ``checkpoint.hf_mapping``:

* fused ``linear_qkv`` rows are grouped per query group as [q heads of the group, k, v], each
  ``kv_channels`` rows; pruning heads keeps the same number of query heads in every group,
  pruning query groups removes whole groups (their q heads, k and v);
* ``linear_fc1`` rows are [gate; up] (SwiGLU): a kept neuron keeps its row in both halves;
* hidden (embedding) channels are columns of the embedding, ``linear_qkv`` and ``linear_fc1``,
  rows of ``linear_proj`` and ``linear_fc2``, and the entries of every norm;
* a mixture-of-experts layer: pruning experts removes their router rows and their slices of the
  stacked expert weights ``[E, 2f, h]`` / ``[E, h, f]``; each kept expert keeps its own neurons
  (the same list for every expert when they are pruned alike); hidden channels are the router's
  columns and each expert's as in a dense MLP.

``kv_channels`` (the head dimension) is never changed by width pruning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from minitron_mcore.models import canonical as keys


@dataclass
class LayerPlan:
    """What one layer keeps (indices into the source layer, ascending)."""

    groups: list[int]
    """Kept query groups."""
    heads: list[list[int]]
    """For each kept group, the kept query heads, as indices within the group."""
    neurons: list[int]
    """Kept MLP neurons (dense layers)."""
    experts: Optional[list[int]] = None
    """Kept experts (mixture-of-experts layers)."""
    expert_neurons: Optional[list[list[int]]] = None
    """For each kept expert, its kept neurons."""


def _idx(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long)


def slice_qkv(
    w: torch.Tensor, plan: LayerPlan, num_groups: int, kv_channels: int, hidden: torch.Tensor | None
) -> torch.Tensor:
    """[g*(hpg+2)*d, h] (or a bias [g*(hpg+2)*d]) -> the kept groups / heads (/ hidden cols)."""
    d = kv_channels
    rest = w.shape[1:]
    per_group = w.reshape(num_groups, -1, d, *rest)  # [g, hpg+2, d, ...]
    hpg = per_group.shape[1] - 2
    parts = []
    for g, heads in zip(plan.groups, plan.heads):
        rows = _idx(list(heads) + [hpg, hpg + 1])  # kept q heads, then k and v
        parts.append(per_group[g].index_select(0, rows))
    out = torch.stack(parts).reshape(-1, *rest)  # [g'*(hpg'+2)*d, ...]
    return out if hidden is None or w.dim() == 1 else out.index_select(1, hidden)


def slice_proj(
    w: torch.Tensor, plan: LayerPlan, num_groups: int, kv_channels: int, hidden: torch.Tensor | None
) -> torch.Tensor:
    """``linear_proj`` [h, heads*d]: columns of the kept heads (group-major order)."""
    d = kv_channels
    h = w.shape[0]
    per_group = w.reshape(h, num_groups, -1, d)  # [h, g, hpg, d]
    cols = [
        per_group[:, g].index_select(1, _idx(heads)) for g, heads in zip(plan.groups, plan.heads)
    ]
    out = torch.stack(cols, dim=1).reshape(h, -1)
    return out if hidden is None else out.index_select(0, hidden)


def slice_fc1(w: torch.Tensor, neurons: torch.Tensor, hidden: torch.Tensor | None):
    """SwiGLU ``linear_fc1`` [2f, h]: the kept neurons' rows in both the gate and up halves."""
    gate, up = torch.chunk(w, 2)
    out = torch.cat([gate.index_select(0, neurons), up.index_select(0, neurons)])
    return out if hidden is None else out.index_select(1, hidden)


def slice_fc2(w: torch.Tensor, neurons: torch.Tensor, hidden: torch.Tensor | None):
    """``linear_fc2`` [h, f]: columns of the kept neurons, rows of the kept channels."""
    out = w.index_select(1, neurons)
    return out if hidden is None else out.index_select(0, hidden)


def prune_layer(
    t: dict[str, torch.Tensor],
    plan: LayerPlan,
    num_groups: int,
    kv_channels: int,
    hidden: list[int] | None,
) -> dict[str, torch.Tensor]:
    """One layer's canonical tensors -> the pruned layer's."""
    hid = None if hidden is None else _idx(hidden)
    out = {
        keys.QKV: slice_qkv(t[keys.QKV], plan, num_groups, kv_channels, hid),
        keys.PROJ: slice_proj(t[keys.PROJ], plan, num_groups, kv_channels, hid),
        keys.INPUT_NORM: t[keys.INPUT_NORM] if hid is None else t[keys.INPUT_NORM][hid],
    }
    if keys.ROUTER in t:
        out.update(prune_experts(t, plan, hid))
    else:
        neurons = _idx(plan.neurons)
        out[keys.FC1] = slice_fc1(t[keys.FC1], neurons, hid)
        out[keys.FC2] = slice_fc2(t[keys.FC2], neurons, hid)
        out[keys.MLP_NORM] = t[keys.MLP_NORM] if hid is None else t[keys.MLP_NORM][hid]
    if keys.QKV_BIAS in t:
        out[keys.QKV_BIAS] = slice_qkv(t[keys.QKV_BIAS], plan, num_groups, kv_channels, None)
    for norm in (keys.Q_NORM, keys.K_NORM):  # over the head dimension, which no target prunes
        if norm in t:
            out[norm] = t[norm]
    return out


def prune_experts(
    t: dict[str, torch.Tensor], plan: LayerPlan, hid: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """A mixture-of-experts layer's norm, router and experts -> the kept experts, each with its
    kept neurons (and the kept hidden channels)."""
    experts = _idx(plan.experts)
    fc1 = t[keys.EXPERT_FC1].index_select(0, experts)
    fc2 = t[keys.EXPERT_FC2].index_select(0, experts)
    neurons = [_idx(n) for n in plan.expert_neurons]
    router = t[keys.ROUTER].index_select(0, experts)
    norm = t[keys.MOE_MLP_NORM]
    return {
        keys.ROUTER: router if hid is None else router.index_select(1, hid),
        keys.EXPERT_FC1: torch.stack([slice_fc1(w, n, hid) for w, n in zip(fc1, neurons)]),
        keys.EXPERT_FC2: torch.stack([slice_fc2(w, n, hid) for w, n in zip(fc2, neurons)]),
        keys.MOE_MLP_NORM: norm if hid is None else norm[hid],
    }


def prune_global(t: dict[str, torch.Tensor], hidden: list[int] | None) -> dict[str, torch.Tensor]:
    """Embedding / output layer columns and the final norm's entries of the kept channels."""
    if hidden is None:
        return dict(t)
    hid = _idx(hidden)
    out = {}
    for k, v in t.items():
        out[k] = v[hid] if k == keys.FINAL_NORM else v.index_select(1, hid)
    return out
