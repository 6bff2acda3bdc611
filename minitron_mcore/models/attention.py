"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

Megatron's local layer spec uses ``DotProductAttention``, which materialises the full
``[b, heads, sq, sk]`` score tensor, applies the mask and softmax as separate ops and copies
keys/values ``heads / groups`` times for GQA.  On CPU (and on a GPU without Transformer Engine)
PyTorch's SDPA does the same maths in one fused kernel (flash attention for CPU, GQA without the
copies), so :class:`SDPAttention` replaces ``core_attention`` in the local spec
(``minitron_mcore.models.build.layer_spec``).  The Transformer Engine spec keeps TE's attention.

The class *is* a ``DotProductAttention`` (a subclass, nothing of Megatron is patched): the
constructor is Megatron's, so the per-partition head counts, the softmax scale
(``1/sqrt(kv_channels)``, ``config.softmax_scale``, ``apply_query_key_layer_scaling``), the
attention dropout module and the state dict are exactly Megatron's.  Only ``forward`` changes,
and it hands over to Megatron's own ``forward`` where SDPA would not compute the same thing:

* **attention dropout while training** (``attention_dropout > 0``).  Megatron draws the dropout
  mask inside the model-parallel RNG tracker's ``fork()`` (different per TP rank, reproducible);
  SDPA's ``dropout_p`` would draw from the same generator but consume it differently, so masks
  would no longer match Megatron's.  Our configs use 0, where the fast path applies; with
  dropout on, the exact Megatron path is kept rather than a look-alike.
* **sliding-window attention** and **non-vanilla softmax** (``softmax_type`` off-by-one or
  learnable: an extra logit per head), which SDPA has no argument for.

Refused, as Megatron's ``DotProductAttention`` refuses them: packed sequences
(``packed_seq_params``; TE's attention handles the THD layout), ``attention_bias``, and a
causal mask without an explicit mask when ``sq != sk`` (except ``sq == 1``, a decode step).

Masking follows Megatron: with an explicit boolean ``attention_mask`` (``True`` = masked out)
only that mask is applied; without one, the causal mask is applied when the mask type is causal
(``attn_mask_type`` of the call if given, else the constructor's; Megatron's local attention
only reads the constructor's, TE's reads the call's - they agree in every GPT model).  One
difference: a query row whose keys are *all* masked gets zeros from SDPA, while Megatron's
``masked_fill(-10000)`` softmax averages all values; such rows are padding and never scored.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class SDPAttention(DotProductAttention):
    """Drop-in for Megatron's ``DotProductAttention`` computed with PyTorch SDPA.

    Same constructor and ``forward`` contract: query ``[sq, b, np, hn]``, key and value
    ``[sk, b, ng, hn]`` (this TP rank's heads and query groups), output ``[sq, b, np * hn]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(
            config=config,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type=attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        # With apply_query_key_layer_scaling Megatron divides the scale by layer_number for the
        # QK^T product and multiplies the scores back in the fp32 softmax (an fp16 overflow
        # guard); the net scale on the logits is the product, which is what SDPA takes.
        coeff = self.scale_mask_softmax.scale
        self.sdpa_scale = self.softmax_scale * (coeff if coeff is not None else 1.0)
        # Features SDPA cannot express: Megatron's own forward computes them.
        self.megatron_only = (
            self.scale_mask_softmax.window_size is not None or self.softmax_offset is not None
        )

    def uses_megatron_path(self) -> bool:
        """True when this call goes to Megatron's ``DotProductAttention.forward``."""
        dropout_on = self.training and self.attention_dropout.p > 0
        return self.megatron_only or dropout_on

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError(
                "SDPAttention (the local layer spec's core attention) does not support packed "
                "sequences (packed_seq_params / THD layout); use the Transformer Engine spec"
            )
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support attention_bias")
        if self.uses_megatron_path():
            return super().forward(query, key, value, attention_mask, attn_mask_type)

        sq, b, np_, hn = query.shape
        sk, ng = key.size(0), key.size(2)
        mask, is_causal = self._sdpa_mask(attention_mask, attn_mask_type, sq, sk)
        # [s, b, heads, hn] -> [b, heads, s, hn]: strided views, the CPU kernel reads strides.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=is_causal,
            scale=self.sdpa_scale,
            # Query head i reads key/value group i // (np / ng), as Megatron's repeat_interleave.
            enable_gqa=ng != np_,
        )  # [b, np, sq, hn]
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _sdpa_mask(
        self,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType],
        sq: int,
        sk: int,
    ) -> tuple[Optional[Tensor], bool]:
        """(SDPA boolean ``attn_mask`` with True = attend, ``is_causal``) for one call."""
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise TypeError(
                    "SDPAttention expects a boolean attention_mask (True = masked out, as "
                    f"Megatron's attention_mask_func), got {attention_mask.dtype}"
                )
            return ~attention_mask, False
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type != AttnMaskType.causal or sq == 1:
            # sq == 1: a decode step against a KV cache sees every cached key (as Megatron).
            return None, False
        if sq != sk:
            raise ValueError(
                f"causal attention without an explicit mask needs sq == sk (got {sq} vs {sk})"
            )
        return None, True
