"""Forward hooks on Megatron-Core modules that collect activation statistics.

Nothing in the model is modified: hooks read the input of ``linear_proj`` (per-head attention
output), the input of ``linear_fc2`` (MLP neuron activations after the gated activation; a
mixture-of-experts layer's experts are scored by ``importance.moe``), the
outputs of ``input_layernorm`` / ``pre_mlp_layernorm`` (embedding channels) and each layer's input
and output (block importance). The model must use the local layer spec, where the norms are
separate modules (the Transformer Engine spec fuses them into the next linear layer).
"""

from __future__ import annotations

import contextlib

import torch

from minitron_mcore.importance.aggregate import Accumulator, block_importance, head_norms


def _hidden_in(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class ActivationCollector:
    """Per global layer: accumulators for heads, MLP neurons, both norms, and BI sums."""

    def __init__(self, model):
        self.layers = {layer.layer_number - 1: layer for layer in model.decoder.layers}
        self.acc: dict[str, Accumulator] = {}
        self.bi: dict[int, torch.Tensor] = {}  # layer -> [sum, count]
        self._handles = []

    def _acc(self, name: str) -> Accumulator:
        return self.acc.setdefault(name, Accumulator())

    def attach(self) -> None:
        for i, layer in self.layers.items():
            attn = layer.self_attention
            heads = attn.num_attention_heads_per_partition

            def on_proj(mod, args, i=i, heads=heads):
                self._acc(f"{i}.heads").add(head_norms(args[0].detach(), heads))

            def on_fc2(mod, args, i=i):
                self._acc(f"{i}.mlp").add(args[0].detach().abs())

            def on_norm(mod, args, out, name):
                self._acc(name).add(out.detach().abs())

            def on_layer(mod, args, kwargs, out, i=i):
                total, n = block_importance(_hidden_in(args, kwargs).detach(), out[0].detach())
                prev = self.bi.get(i, torch.zeros(2, device=total.device))
                self.bi[i] = prev + torch.stack([total, n])

            if hasattr(layer.mlp, "linear_fc2"):  # a mixture of experts: importance/moe.py
                self._handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(on_fc2))
            self._handles += [
                attn.linear_proj.register_forward_pre_hook(on_proj),
                layer.input_layernorm.register_forward_hook(
                    lambda m, a, o, n=f"{i}.norm_in": on_norm(m, a, o, n)
                ),
                layer.pre_mlp_layernorm.register_forward_hook(
                    lambda m, a, o, n=f"{i}.norm_mlp": on_norm(m, a, o, n)
                ),
                layer.register_forward_hook(on_layer, with_kwargs=True),
            ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def skip_layers(model, layers: set[int]):
    """Run ``model`` with the given global layers replaced by the identity (their output is
    their input), to measure the LM loss without them. The layers' ``forward`` is shadowed for
    the duration, so a skipped layer costs nothing; the model is restored on exit."""
    with skip_layers_of(model.decoder.layers, layers):
        yield


@contextlib.contextmanager
def skip_layers_of(layers, numbers: set[int] | None):
    """Shadow ``forward`` of the given layers (all of them if ``numbers`` is None, else those
    whose global index is in ``numbers``) with the identity."""

    def identity(*args, **kwargs):
        return _hidden_in(args, kwargs), kwargs.get("context")

    skipped = [layer for layer in layers if numbers is None or layer.layer_number - 1 in numbers]
    for layer in skipped:
        layer.forward = identity  # instance attribute: nn.Module.__call__ calls self.forward
    try:
        yield
    finally:
        for layer in skipped:
            del layer.forward


class LayerInputCache:
    """Layer-removal passes that restart from cached layer inputs (one pipeline stage only).

    ``capture()``: while active, every layer's input hidden states are kept, per micro-batch, in
    the order the forward passes run. ``without(start, n)``: while active, the model computes as
    if layers ``start .. start+n-1`` were removed, but the layers before ``start`` are not run
    again: the first layer returns the cached input of layer ``start`` (= what the removed block
    would have received), every other layer up to the block's end is the identity. Each pass then
    costs L - start - n layers instead of L - n; over all blocks that is about half.
    The runs replayed must use the same micro-batches, in the same order, as the capture."""

    def __init__(self, model):
        self.layers = sorted(model.decoder.layers, key=lambda layer: layer.layer_number)
        self.inputs: list[list[torch.Tensor]] = []  # [micro-batch][layer]
        self.nbytes = 0

    @contextlib.contextmanager
    def capture(self):
        self.inputs, self.nbytes = [], 0

        def keep(mod, args, kwargs, i):
            if i == 0:  # a new micro-batch; the first layer's input is never replayed
                self.inputs.append([None])
                return
            x = _hidden_in(args, kwargs).detach().clone()
            self.inputs[-1].append(x)
            self.nbytes += x.numel() * x.element_size()

        handles = [
            layer.register_forward_pre_hook(lambda m, a, k, i=i: keep(m, a, k, i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def without(self, start: int, n: int):
        if start == 0:  # nothing before the block: plain skipping
            with skip_layers_of(self.layers, set(range(n))):
                yield
            return
        micro = iter(self.inputs)

        def restart(*args, **kwargs):
            return next(micro)[start], kwargs.get("context")

        with skip_layers_of(self.layers[1 : start + n], None):
            self.layers[0].forward = restart
            try:
                yield
            finally:
                del self.layers[0].forward
