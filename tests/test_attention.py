"""SDPAttention (the local spec's core attention) against Megatron's DotProductAttention.

Both modules get the same random query/key/value ([s, b, heads, hn], TP=1); the outputs and the
gradients with respect to q, k and v must agree: tightly in fp32, loosely in bf16 (where SDPA
also must not be further from an fp64 reference than Megatron is).
"""

from __future__ import annotations

import pytest
import torch

from minitron_mcore import compat

SQ, B, HN = 24, 3, 16


@pytest.fixture(scope="module", autouse=True)
def parallel():
    from minitron_mcore.parallel import ParallelConfig, parallel_context

    compat.activate()
    with parallel_context(ParallelConfig(), seed=1234):
        yield


def _config(heads, groups, dtype=torch.float32, **kw):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=4,
        hidden_size=heads * HN,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=HN,
        hidden_dropout=0.0,
        attention_dropout=kw.pop("attention_dropout", 0.0),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        masked_softmax_fusion=False,
        **kw,
    )


def _pair(config, layer_number=1, mask_type=None):
    """(Megatron's DotProductAttention, SDPAttention) built alike, as SelfAttention builds it."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from minitron_mcore.models.attention import SDPAttention

    kw = dict(
        config=config,
        layer_number=layer_number,
        attn_mask_type=mask_type or AttnMaskType.causal,
        attention_type="self",
        softmax_scale=config.softmax_scale,
    )
    return DotProductAttention(**kw), SDPAttention(**kw)


def _qkv(heads, groups, dtype, sq=SQ, sk=SQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(sq, B, heads, HN), (sk, B, groups, HN), (sk, B, groups, HN)]
    # Scaled so the softmax is far from uniform (a weak test otherwise).
    return [(2 * torch.randn(s, generator=g)).to(dtype).requires_grad_() for s in shapes]


def _run(module, qkv, grad_out, mask=None, **kw):
    """Output and d(output . grad_out)/d(q, k, v) of ``module``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv)
    out = module(q, k, v, mask, **kw)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in (q, k, v)]


def _compare(ref, got, atol, rtol):
    """assert_close per tensor, ``atol`` relative to the tensor's largest magnitude (gradients
    reach ~10 here, where fp32 rounding alone differs by ~1e-6)."""
    for name, a, b in zip(["output", "dq", "dk", "dv"], ref, got):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = max(1.0, a.abs().max().item())
        torch.testing.assert_close(
            b, a, atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )


HEADS = [pytest.param(4, 4, id="mha"), pytest.param(6, 2, id="gqa"), pytest.param(4, 1, id="mqa")]


@pytest.mark.parametrize("heads,groups", HEADS)
def test_fp32_causal_matches_megatron(heads, groups):
    meg, sdpa = _pair(_config(heads, groups))
    qkv = _qkv(heads, groups, torch.float32)
    grad = torch.randn(SQ, B, heads * HN)
    ref = _run(meg, qkv, grad)
    assert ref[0].shape == (SQ, B, heads * HN)
    _compare(ref, _run(sdpa, qkv, grad), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,groups", HEADS)
def test_bf16_causal_matches_megatron(heads, groups):
    meg, sdpa = _pair(_config(heads, groups, torch.bfloat16))
    qkv = _qkv(heads, groups, torch.bfloat16)
    grad = torch.randn(SQ, B, heads * HN).to(torch.bfloat16)
    ref, got = _run(meg, qkv, grad), _run(sdpa, qkv, grad)
    _compare(ref, got, atol=2e-2, rtol=5e-2)
    # The exact answer: Megatron's module in fp64 on the same (bf16-rounded) inputs.
    meg64, _ = _pair(_config(heads, groups, torch.float64))
    exact = _run(meg64, [t.double() for t in qkv], grad.double())
    for name, r, s, e in zip(["output", "dq", "dk", "dv"], ref, got, exact):
        err_meg = (r.double() - e).abs().max().item()
        err_sdpa = (s.double() - e).abs().max().item()
        assert err_sdpa <= 1.5 * err_meg + 1e-3, (name, err_sdpa, err_meg)


def test_scales_and_layer_scaling_match_megatron():
    # config.softmax_scale overrides 1/sqrt(kv_channels); query-key layer scaling divides by
    # layer_number in QK^T and multiplies back in the softmax (net: no change).
    config = _config(4, 2, softmax_scale=0.3, apply_query_key_layer_scaling=True)
    meg, sdpa = _pair(config, layer_number=3)
    assert sdpa.sdpa_scale == pytest.approx(0.3)
    qkv = _qkv(4, 2, torch.float32, seed=1)
    grad = torch.randn(SQ, B, 4 * HN)
    _compare(_run(meg, qkv, grad), _run(sdpa, qkv, grad), atol=1e-5, rtol=1e-5)


def test_explicit_mask_and_no_mask_match_megatron():
    from megatron.core.transformer.enums import AttnMaskType

    qkv = _qkv(6, 2, torch.float32, seed=2)
    grad = torch.randn(SQ, B, 6 * HN)
    # A boolean mask (True = masked out) replaces the causal one, as in Megatron; every row
    # keeps its diagonal so no row is fully masked.
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(B, 1, SQ, SQ, generator=g) < 0.4
    mask &= ~torch.eye(SQ, dtype=torch.bool)
    meg, sdpa = _pair(_config(6, 2))
    _compare(_run(meg, qkv, grad, mask), _run(sdpa, qkv, grad, mask), atol=1e-5, rtol=1e-5)
    # No mask type: full attention.
    meg, sdpa = _pair(_config(6, 2), mask_type=AttnMaskType.no_mask)
    _compare(_run(meg, qkv, grad), _run(sdpa, qkv, grad), atol=1e-5, rtol=1e-5)


def test_single_query_sees_every_key():
    # sq == 1 against a longer key sequence (a decode step): no causal mask, as in Megatron.
    meg, sdpa = _pair(_config(4, 2))
    qkv = _qkv(4, 2, torch.float32, sq=1, sk=SQ, seed=4)
    grad = torch.randn(1, B, 4 * HN)
    _compare(_run(meg, qkv, grad), _run(sdpa, qkv, grad), atol=1e-5, rtol=1e-5)


def test_attention_dropout_uses_megatrons_path():
    """With attention dropout on, training goes through Megatron's forward (its dropout mask
    drawn in the RNG tracker's fork), so both modules give the same output for the same RNG
    state; in eval mode dropout is off and SDPA is used again."""
    from megatron.core import tensor_parallel

    meg, sdpa = _pair(_config(4, 2, attention_dropout=0.3))
    assert sdpa.uses_megatron_path()
    qkv = _qkv(4, 2, torch.float32, seed=5)
    grad = torch.randn(SQ, B, 4 * HN)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    outs = []
    for module in (meg, sdpa):
        tensor_parallel.model_parallel_cuda_manual_seed(99)
        outs.append(_run(module, qkv, grad))
        assert tracker.is_initialized()
    _compare(outs[0], outs[1], atol=0, rtol=0)
    meg.eval(), sdpa.eval()
    assert not sdpa.uses_megatron_path()
    _compare(_run(meg, qkv, grad), _run(sdpa, qkv, grad), atol=1e-5, rtol=1e-5)


def test_refuses_packed_sequences_and_bias():
    from megatron.core.packed_seq_params import PackedSeqParams

    _, sdpa = _pair(_config(4, 2))
    q, k, v = _qkv(4, 2, torch.float32)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        sdpa(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(NotImplementedError, match="attention_bias"):
        sdpa(q, k, v, None, attention_bias=torch.zeros(1))


def test_local_spec_uses_sdpa_and_te_spec_is_untouched():
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from minitron_mcore.models.attention import SDPAttention
    from minitron_mcore.models.build import layer_spec
    from minitron_mcore.models.norm import RMSNorm

    ours = layer_spec(use_te=False)
    megatron = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    attn, meg_attn = ours.submodules.self_attention, megatron.submodules.self_attention
    assert attn.submodules.core_attention is SDPAttention
    # Everything else is Megatron's local spec.
    assert attn.module is meg_attn.module and attn.params == meg_attn.params
    for field in ("linear_qkv", "linear_proj", "q_layernorm", "k_layernorm"):
        assert getattr(attn.submodules, field) == getattr(meg_attn.submodules, field), field
    for field in ("mlp", "self_attn_bda", "mlp_bda", "sharded_state_dict_keys_map"):
        assert getattr(ours.submodules, field) == getattr(megatron.submodules, field), field
    # The norms are torch's RMSNorm as in Megatron's spec, marked for sequence parallelism
    # (models/norm.py); the key map keeps their checkpoint names (the TE spec's).
    assert ours.submodules.input_layernorm is ours.submodules.pre_mlp_layernorm is RMSNorm
    # The TE spec is only built where TE imports; there the core attention stays TE's.
    if torch.cuda.is_available():
        pytest.importorskip("transformer_engine")
        te_attn = layer_spec(use_te=True).submodules.self_attention.submodules.core_attention
        assert te_attn is not SDPAttention


def test_gpt_model_built_with_sdpa():
    from minitron_mcore.models.arch import ModelArch
    from minitron_mcore.models.attention import SDPAttention
    from minitron_mcore.models.build import build_model_for_stage

    arch = ModelArch(
        family="llama",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    model = build_model_for_stage(arch, use_te=False)
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert len(cores) == 2 and all(type(c) is SDPAttention for c in cores)
    # Same state dict keys as with Megatron's attention (checkpoints stay compatible).
    assert not any("core_attention" in k for k in model.state_dict())


def test_rms_norm_is_torchs_and_marked_for_sequence_parallelism():
    """models.norm.RMSNorm computes what Megatron's WrappedTorchNorm (torch.nn.RMSNorm) does, has
    its state dict, and marks its weight for the TP all-reduce of sequence parallelism."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from minitron_mcore.models.norm import RMSNorm

    kw = dict(num_layers=1, hidden_size=16, num_attention_heads=2, normalization="RMSNorm")
    ref = WrappedTorchNorm(TransformerConfig(**kw), 16, eps=1e-6)
    ours = RMSNorm(TransformerConfig(**kw), 16, eps=1e-6, persist_layer_norm=True)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 16)
    assert torch.equal(ours(x), ref(x)) and ours.weight.sequence_parallel is False
    sp = TransformerConfig(**kw, tensor_model_parallel_size=2, sequence_parallel=True)
    assert RMSNorm(sp, 16).weight.sequence_parallel is True
