"""RMSNorm for the local layer spec, usable with sequence parallelism.

Megatron's local spec builds its norms with ``WrappedTorchNorm`` (``torch.nn.RMSNorm``), which
refuses ``sequence_parallel`` and ``persist_layer_norm``; its decoder's final norm is Apex's
``FusedLayerNorm`` where Apex is installed, which refuses RMSNorm. :class:`RMSNorm` is
``torch.nn.RMSNorm`` behind Megatron's norm constructor (``config``, ``hidden_size``, ``eps``),
with its weight marked ``sequence_parallel`` as Megatron's own norms mark theirs: under
sequence parallelism each tensor-parallel rank normalises only its ``s/tp`` tokens, and
Megatron's ``finalize_model_grads`` all-reduces the gradients of parameters so marked over the
tensor-parallel group. Its state dict is ``torch.nn.RMSNorm``'s (``weight``), so checkpoints are
the same as with Megatron's norms (and, through the local spec's key map, the Transformer
Engine spec's fused ``layer_norm_weight`` names). The Transformer Engine spec keeps TE's norms.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with Megatron's norm constructor and sequence-parallel marking."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        # **_unused: persist_layer_norm / zero_centered_gamma / normalization, which Megatron
        # passes to every norm; the local spec uses none of them (RMSNorm, plain gamma).
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("models.norm.RMSNorm implements RMSNorm with a plain gamma only")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
