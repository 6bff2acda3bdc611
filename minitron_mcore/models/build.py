"""ModelArch -> Megatron ``TransformerConfig`` + layer spec -> ``GPTModel``.

The model code is Megatron's, untouched: this module only chooses the config and the spec.
On a GPU with Transformer Engine installed the TE spec (fused layernorm-linear, fused attention)
is used; otherwise Megatron's local spec, which runs on CPU, with its core attention replaced by
:class:`~minitron_mcore.models.attention.SDPAttention` (PyTorch's fused SDPA kernel instead of
Megatron's unfused attention).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from minitron_mcore.errors import require
from minitron_mcore.models.arch import ModelArch, padded_vocab_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    require(name in DTYPES, f"dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def train_dtype(precision: str) -> torch.dtype:
    """``train.precision``: auto = bf16 on a GPU that supports it, fp32 otherwise."""
    require(
        precision in ("auto", "fp32", "bf16"),
        f"train.precision={precision!r}: use auto, fp32 or bf16",
    )
    if precision == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return resolve_dtype(precision)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def have_transformer_engine() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(use_te: bool | None = None, qk_norm: bool = False, num_experts: int | None = None):
    """Megatron layer spec: Transformer Engine on GPU when importable, local otherwise;
    ``qk_norm``: with the per-head query/key norms (Qwen3); ``num_experts``: a mixture of
    experts MLP (Megatron's ``MoELayer``)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te is None:
        use_te = have_transformer_engine()
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, qk_layernorm=qk_norm
        )
    return local_layer_spec(qk_norm, num_experts)


def local_layer_spec(qk_norm: bool = False, num_experts: int | None = None):
    """Megatron's local spec (RMSNorm) with ``SDPAttention`` as the self-attention's
    ``core_attention`` and :class:`~minitron_mcore.models.norm.RMSNorm` as its norms (which
    work with sequence parallelism and on a GPU, where Megatron's ``WrappedTorchNorm`` does
    not), the query/key norms included with ``qk_norm``; every other submodule is
    Megatron's."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from minitron_mcore.models.attention import SDPAttention
    from minitron_mcore.models.norm import RMSNorm

    if num_experts:
        _router_without_te()
    spec = specs.get_gpt_layer_local_spec(
        num_experts=num_experts, normalization="RMSNorm", qk_layernorm=qk_norm
    )
    attn = spec.submodules.self_attention
    if attn.submodules.core_attention is not DotProductAttention:
        # SDPAttention matches DotProductAttention's contract; anything else there is a
        # Megatron change to look at before swapping it out.
        raise RuntimeError(
            f"Megatron's local spec uses {attn.submodules.core_attention} as core attention, "
            "expected DotProductAttention"
        )
    norms = dict(q_layernorm=RMSNorm, k_layernorm=RMSNorm) if qk_norm else {}
    attn_sub = dataclasses.replace(attn.submodules, core_attention=SDPAttention, **norms)
    keys_map = dict(spec.submodules.sharded_state_dict_keys_map)
    if num_experts:  # the pre-MLP norm keeps its own name, as in the TE spec's MoE layers
        keys_map.pop("pre_mlp_layernorm.", None)
    layer_sub = dataclasses.replace(
        spec.submodules,
        self_attention=dataclasses.replace(attn, submodules=attn_sub),
        input_layernorm=RMSNorm,
        pre_mlp_layernorm=RMSNorm,
        sharded_state_dict_keys_map=keys_map,
    )
    return dataclasses.replace(spec, submodules=layer_sub)


def _router_without_te() -> None:
    """Megatron 0.16's MoE router gating asks ``te_general_gemm is not None``, a name its
    ``moe_utils`` only defines when Transformer Engine imports: without TE the router raises
    NameError. Define it as absent (what Megatron means when TE is missing)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def block_spec(config, use_te: bool):
    """What ``GPTModel`` builds its decoder from: the TE layer spec as it is; for the local
    spec, this stage's layers plus :class:`~minitron_mcore.models.norm.RMSNorm` as the final
    norm - given a layer spec alone, Megatron picks the final norm by what is installed (Apex's
    LayerNorm-only ``FusedLayerNorm`` where Apex is, TE's where TE is)."""
    if use_te:
        return layer_spec(True, config.qk_layernorm, config.num_moe_experts)
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from minitron_mcore.models.norm import RMSNorm

    n = get_num_layers_to_build(config)
    layers = [local_layer_spec(config.qk_layernorm, config.num_moe_experts)] * n
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm)


def _keep_as_allocated(weight: torch.Tensor) -> None:
    """An init method that leaves the weight as allocated (see loaded_weights_kwargs)."""


def loaded_weights_kwargs() -> dict:
    """TransformerConfig fields for a model whose weights are loaded right after it is built:
    no random draw (the normal init of an 8B model costs minutes on the host). Not
    ``perform_initialization=False``: Megatron 0.16 sets the tensor-parallel attributes of its
    parallel layers' weights inside the initialisation it skips, and without them the
    gradient norm (and everything else that asks whether a parameter is sharded) treats every
    sharded weight as a TP duplicate. Init methods that do nothing keep those attributes."""
    return {
        "init_method": _keep_as_allocated,
        "output_layer_init_method": _keep_as_allocated,
        "embedding_init_method": _keep_as_allocated,
    }


def moe_config(arch: ModelArch, ep: int = 1) -> dict:
    """Megatron's mixture-of-experts fields for ``arch`` (none for a dense model): top-k
    routing after the softmax over the top k logits (Mixtral, Qwen3-MoE's ``norm_topk_prob``)
    or cut from the softmax over all experts (``pre_softmax``), the load-balancing loss, one
    SwiGLU MLP per expert (``SequentialMLP``; grouped GEMMs need TE/CUTLASS on a GPU), the
    all-to-all token dispatcher (tokens travel to their experts' ranks under expert
    parallelism). ``ep``: the expert-parallel size the model is built for - Megatron's layers
    read it to mark expert weights as not data-parallel replicas (``allreduce=False``): left
    at 1, DDP would sum the gradients of different experts across the EP ranks."""
    if not arch.is_moe:
        return {}
    return dict(
        expert_model_parallel_size=ep,
        num_moe_experts=arch.num_moe_experts,
        moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size or arch.ffn_hidden_size,
        moe_router_pre_softmax=not arch.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss" if arch.moe_aux_loss_coeff else "none",
        moe_aux_loss_coeff=arch.moe_aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
    )


def transformer_config(
    arch: ModelArch,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    ep: int = 1,
    **extra,
):
    """Megatron ``TransformerConfig`` for ``arch``.

    Dropout defaults to 0 (Megatron's default is 0.1): Llama, Mistral and Qwen are trained without
    it, and equal-logits comparisons need it off.  ``extra`` passes further TransformerConfig
    fields: what training turns on (``calculate_per_token_loss``, ``sequence_parallel``,
    ``gradient_accumulation_fusion``, recomputation: ``train/fast_paths.py``), the RoPE fusion
    of the TE spec, :func:`loaded_weights_kwargs` for models whose weights are loaded (or
    ``perform_initialization=False`` for one that is only filled and written, never trained).
    """
    from megatron.core.transformer import TransformerConfig

    gpu = torch.cuda.is_available()
    extra = {"apply_rope_fusion": False, "gradient_accumulation_fusion": False, **extra}
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        **moe_config(arch, ep),
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        init_method_std=arch.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Fused kernels need CUDA (and apex/TE); on CPU the plain PyTorch paths are used.
        use_cpu_initialization=not gpu,
        masked_softmax_fusion=gpu,
        bias_activation_fusion=gpu,
        # Only Apex's LayerNorm has a persistent kernel; every norm here is an RMSNorm (and
        # Megatron's torch norm refuses the flag).
        persist_layer_norm=False,
        **extra,
    )


def build_gpt(
    arch: ModelArch,
    config,
    pre_process: bool = True,
    post_process: bool = True,
    use_te: bool | None = None,
    vocab_multiple: int = 128,
):
    """A Megatron ``GPTModel`` for this rank's pipeline stage."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(
            config, have_transformer_engine() if use_te is None else use_te
        ),
        vocab_size=padded_vocab_size(arch.vocab_size, vocab_multiple),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )


def build_model_for_stage(
    arch: ModelArch, dtype: torch.dtype = torch.float32, use_te: bool | None = None, **config_kw
):
    """Build this rank's part of the model using the already-initialised parallel state, on
    this rank's device (``parallel.device()``). ``use_te``: the Transformer Engine spec (None:
    when TE is importable on a GPU), with its fused RoPE as Megatron-LM uses it."""
    from megatron.core import parallel_state as ps

    from minitron_mcore.parallel import device

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    use_te = have_transformer_engine() if use_te is None else use_te
    ep = ps.get_expert_model_parallel_world_size()
    arch.check_parallel(tp, pp, ep)
    kw = {"apply_rope_fusion": use_te, **config_kw}
    config = transformer_config(arch, tp, pp, dtype, ep=ep, **kw)
    model = build_gpt(
        arch,
        config,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        use_te=use_te,
    )
    # Megatron builds its parallel layers on the GPU (``use_cpu_initialization`` off there) but
    # plain torch modules (the local spec's norms) on the host, and leaves those in fp32 when
    # params_dtype is bf16 (mixed dtypes defeat the fused norm kernel). Megatron-LM moves the
    # whole model to the GPU and casts it (``get_model``: ``.cuda()``, Float16Module) - so do we.
    model.to(device=device(), dtype=dtype)
    return model
