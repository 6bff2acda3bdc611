"""Pure HF <-> Megatron tensor layout functions."""

import pytest
import torch

from minitron_mcore.checkpoint import hf_mapping as m
from minitron_mcore.errors import MinitronError
from minitron_mcore.models.arch import ModelArch


def test_qkv_interleave_groups_q_heads_with_their_kv():
    arch = ModelArch(hidden_size=8, num_attention_heads=4, num_query_groups=2, kv_channels=2)
    d = arch.kv_channels
    q = torch.arange(4 * d).float().unsqueeze(1)  # head h rows: [2h, 2h+1]
    k = 100 + torch.arange(2 * d).float().unsqueeze(1)
    v = 200 + torch.arange(2 * d).float().unsqueeze(1)
    fused = m.interleave_qkv(q, k, v, arch).squeeze(1).tolist()
    # group 0: q heads 0,1 then k0, v0; group 1: q heads 2,3 then k1, v1
    assert fused == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    q2, k2, v2 = m.split_qkv(m.interleave_qkv(q, k, v, arch), arch)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_qkv_bias_round_trip():
    arch = ModelArch(hidden_size=16, num_attention_heads=4, num_query_groups=1, kv_channels=8)
    q, k, v = torch.randn(32), torch.randn(8), torch.randn(8)
    out = m.split_qkv(m.interleave_qkv(q, k, v, arch), arch)
    assert all(torch.equal(a, b) for a, b in zip(out, (q, k, v)))


def _cfg(**kw):
    base = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return dict(base, **kw)


def test_legacy_v4_rope_fields_are_read():
    cfg = _cfg(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    arch = m.arch_from_hf_config(cfg)
    assert arch.rotary_base == 500000.0 and arch.rope_scaling_factor == 8.0


def test_v5_rope_parameters_are_read():
    cfg = _cfg(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    arch = m.arch_from_hf_config(cfg)
    assert arch.rotary_base == 1e6 and arch.rope_scaling_factor is None


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(model_type="gpt2"), "not supported"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (
            dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}),
            "low_freq_factor",
        ),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(model_type="qwen2", use_sliding_window=True), "sliding-window"),
    ],
)
def test_unsupported_configs_fail_clearly(kw, msg):
    with pytest.raises(MinitronError, match=msg):
        m.arch_from_hf_config(_cfg(**kw))


def test_vocab_padding_rows_are_zero_and_removed_on_export():
    arch = ModelArch(vocab_size=5, hidden_size=4, num_attention_heads=1, num_query_groups=1)
    emb = torch.randn(5, 4)
    canon = m.hf_global_to_canonical(
        {
            "model.embed_tokens.weight": emb,
            "model.norm.weight": torch.ones(4),
            "lm_head.weight": emb,
        }.__getitem__,
        arch,
        8,
    )
    assert canon[m.EMBED].shape == (8, 4) and canon[m.EMBED][5:].abs().sum() == 0
    back = m.canonical_global_to_hf(canon, arch)
    assert torch.equal(back["model.embed_tokens.weight"], emb)


def test_mistral_sliding_window_shorter_than_context_is_refused():
    """Mistral-7B-v0.1: a 4096-token window in a 32768-position model is not full attention."""
    cfg = _cfg(model_type="mistral", sliding_window=4096, max_position_embeddings=32768)
    with pytest.raises(MinitronError, match="sliding_window=4096") as e:
        m.arch_from_hf_config(cfg)
    assert "\n" not in str(e.value) and "max_position_embeddings" in str(e.value)


@pytest.mark.parametrize("window", [None, 32768, 131072])
def test_mistral_sliding_window_covering_context_is_full_attention(window):
    cfg = _cfg(model_type="mistral", sliding_window=window, max_position_embeddings=32768)
    assert m.arch_from_hf_config(cfg).family == "mistral"


def test_qwen2_sliding_window_is_ignored_when_not_used():
    """Qwen2 configs carry a sliding_window that only applies with use_sliding_window=true."""
    cfg = _cfg(
        model_type="qwen2",
        sliding_window=4096,
        use_sliding_window=False,
        max_position_embeddings=32768,
    )
    assert m.arch_from_hf_config(cfg).family == "qwen2"


def _mistral_arch():
    return m.arch_from_hf_config(_cfg(model_type="mistral", max_position_embeddings=32768))


@pytest.mark.parametrize(
    "base,want",
    [(None, None), ({"sliding_window": None}, None), ({"sliding_window": 32768}, 32768)],
)
def test_mistral_export_config_stays_full_attention(base, want):
    """Without an explicit value transformers' MistralConfig defaults to a 4096 window."""
    from transformers import AutoConfig

    cfg = m.hf_config_from_arch(_mistral_arch(), base, "bf16")
    assert "sliding_window" in cfg and cfg["sliding_window"] == want
    model_type = cfg.pop("model_type")
    assert AutoConfig.for_model(model_type, **cfg).sliding_window == want


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    "params,theta,scaling",
    [
        (dict(LLAMA3_SCALING, rope_theta=500000.0), 500000.0, LLAMA3_SCALING),
        ({"rope_type": "default", "rope_theta": 1e6}, 1e6, None),
        ({"rope_type": "default", "rope_theta": 10000}, 10000.0, None),
    ],
)
def test_classic_rope_keys_are_added_next_to_rope_parameters(params, theta, scaling):
    saved = {"model_type": "llama", "rope_parameters": params}
    out = m.with_classic_rope_keys(saved)
    assert out["rope_parameters"] == params and out["model_type"] == "llama"
    assert isinstance(out["rope_theta"], float) and out["rope_theta"] == theta
    assert out["rope_scaling"] == scaling
    assert "rope_theta" not in saved  # the input is not modified
    # The classic keys alone describe the same RoPE.
    back = m.arch_from_hf_config(_cfg(rope_theta=out["rope_theta"], rope_scaling=scaling))
    assert back.rotary_base == theta
    assert back.rope_scaling_factor == (scaling or {}).get("factor")


def test_classic_rope_keys_written_for_every_family(tmp_path):
    """hf_config_from_arch -> transformers' save_pretrained -> write_classic_rope_keys gives a
    config.json with both layouts that transformers loads back to the same RoPE."""
    import json

    from transformers import AutoConfig

    for i, kw in enumerate(
        [
            dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, max_position_embeddings=16384),
            dict(model_type="mistral", rope_theta=1e6),
            dict(model_type="qwen2", rope_theta=1e6, rope_scaling=None),
        ]
    ):
        arch = m.arch_from_hf_config(_cfg(**kw))
        cfg = m.hf_config_from_arch(arch, None, "fp32")
        out = str(tmp_path / str(i))
        AutoConfig.for_model(cfg.pop("model_type"), **cfg).save_pretrained(out)
        m.write_classic_rope_keys(out)
        with open(f"{out}/config.json") as f:
            saved = json.load(f)
        assert saved["rope_theta"] == kw["rope_theta"]
        assert saved["rope_scaling"] == kw.get("rope_scaling")
        assert saved["rope_parameters"]["rope_theta"] == kw["rope_theta"]
        assert m.arch_from_hf_config(saved) == arch
        assert AutoConfig.from_pretrained(out).rope_parameters == saved["rope_parameters"]
