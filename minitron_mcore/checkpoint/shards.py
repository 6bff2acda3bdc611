"""A model's ``sharded_state_dict`` seen as global per-layer tensors: which slice of which global
tensor each of this rank's parameters holds, and filling a model from global tensors one layer at
a time (HF import, pruning)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from minitron_mcore.errors import require


def _sharded_tensors(model):
    """This rank's ShardedTensors for ``model``, with factories applied, so each tensor's
    ``data`` is a view of (part of) a parameter."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    # An explicit stack, not a recursive closure: the closure's self-reference forms a cycle
    # that kept every ShardedTensor (and the parameter views they hold) alive until the next
    # cyclic GC - prune could not free source layers (benchmarks/README.md, bench_prune).
    out, stack = [], [sd]
    while stack:
        x = stack.pop()
        if isinstance(x, ShardedTensor):
            out.append(x)
        elif isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
        elif isinstance(x, (list, tuple)):
            stack.extend(reversed(x))
    return out


def _local_slice(sh, global_tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (per-layer) global tensor that ShardedTensor ``sh`` holds. Prepended axes
    after the layer's (an expert's index in a mixture-of-experts layer: ``[E, ...]`` per layer)
    pick one entry; the rest are sliced."""
    pre = sh.global_offset[1 : sh.prepend_axis_num]  # (the layer's axis is not in the tensor)
    offsets = sh.global_offset[sh.prepend_axis_num :]
    idx = tuple(slice(o, o + n) for o, n in zip(offsets, sh.local_shape))
    return global_tensor[tuple(pre) + idx]


def layer_of(sh) -> Optional[int]:
    """Global layer index of a per-layer ShardedTensor, ``None`` for embeddings etc."""
    return sh.global_offset[0] if sh.prepend_axis_num >= 1 else None


LayerFn = Callable[[int], dict[str, torch.Tensor]]


def shards_by_layer(model) -> dict[Optional[int], list]:
    """This rank's ShardedTensors grouped by global layer (``None``: embeddings, final norm,
    output layer)."""
    by_layer: dict[Optional[int], list] = {}
    for sh in _sharded_tensors(model):
        by_layer.setdefault(layer_of(sh), []).append(sh)
    return by_layer


@torch.no_grad()
def copy_into_shards(shards: list, canon: dict[str, torch.Tensor]) -> None:
    """Copy global (per-layer) tensors into the local parameter slices described by ``shards``."""
    for sh in shards:
        require(sh.key in canon, f"no source tensor for {sh.key}")
        src = _local_slice(sh, canon[sh.key])
        require(
            tuple(src.shape) == tuple(sh.data.shape),
            f"shape mismatch for {sh.key}: source {tuple(src.shape)} vs model "
            f"{tuple(sh.data.shape)}",
        )
        sh.data.copy_(src)


def fill_model(
    model,
    layer_fn: LayerFn,
    global_fn: Callable[[], dict[str, torch.Tensor]],
    desc: str = "loading",
):
    """Copy canonical global tensors into this rank's shards of ``model``.

    ``layer_fn(i)`` returns layer ``i``'s canonical tensors, ``global_fn()`` the others.  Layers are
    converted one at a time, so memory stays near the local model plus one global layer.
    """
    from minitron_mcore.utils.log import progress

    by_layer = shards_by_layer(model)
    order = sorted(by_layer, key=lambda x: -1 if x is None else x)
    for layer in progress(order, desc=desc, unit="layer"):
        copy_into_shards(by_layer[layer], global_fn() if layer is None else layer_fn(layer))
