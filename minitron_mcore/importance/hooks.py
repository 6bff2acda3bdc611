"""Forward hooks on Megatron-Core modules that collect activation statistics.

Nothing in the model is modified: hooks read the input of ``linear_proj`` (per-head attention
output), the input of ``linear_fc2`` (MLP neuron activations after the gated activation), the
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

            self._handles += [
                attn.linear_proj.register_forward_pre_hook(on_proj),
                layer.mlp.linear_fc2.register_forward_pre_hook(on_fc2),
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

    def identity(*args, **kwargs):
        return _hidden_in(args, kwargs), kwargs.get("context")

    skipped = [layer for layer in model.decoder.layers if layer.layer_number - 1 in layers]
    for layer in skipped:
        layer.forward = identity  # instance attribute: nn.Module.__call__ calls self.forward
    try:
        yield
    finally:
        for layer in skipped:
            del layer.forward
