"""Model families and presets: shapes, parameter counts, TP/PP validity."""

import pytest

from minitron_mcore.checkpoint.hf_mapping import arch_from_hf_config, hf_config_from_arch
from minitron_mcore.errors import MinitronError
from minitron_mcore.models.arch import ModelArch, load_preset, padded_vocab_size, preset_names


@pytest.mark.parametrize(
    "name,params",
    [
        # Published parameter counts of the Hugging Face releases.
        ("llama3.1-8b", 8_030_261_248),
        ("mistral-nemo-12b", 12_247_782_400),
        ("llama3.2-1b", 1_235_814_400),
        ("qwen2.5-7b", 7_615_616_512),
    ],
)
def test_paper_presets_have_published_parameter_counts(name, params):
    assert load_preset(name).num_params() == params


def test_every_preset_loads_and_round_trips_through_hf_config():
    for name in preset_names():
        arch = load_preset(name)
        back = arch_from_hf_config(hf_config_from_arch(arch, None, "bf16"))
        assert back.to_dict() == arch.replace(init_std=back.init_std).to_dict(), name


def test_mistral_nemo_head_dim_differs_from_hidden_over_heads():
    arch = load_preset("mistral-nemo-12b")
    assert arch.kv_channels == 128 != arch.hidden_size // arch.num_attention_heads


def test_unknown_preset_and_field():
    with pytest.raises(MinitronError, match="not a preset"):
        load_preset("llama-99b")
    with pytest.raises(MinitronError, match="unknown model fields"):
        ModelArch.from_dict({"family": "llama", "hiden_size": 3})


@pytest.mark.parametrize(
    "tp,pp,msg",
    [(3, 1, "num_attention_heads"), (16, 1, "num_query_groups"), (1, 3, "num_layers")],
)
def test_check_parallel_rejects_bad_layouts(tp, pp, msg):
    with pytest.raises(MinitronError, match=msg):
        load_preset("llama3.1-8b").check_parallel(tp, pp)
    load_preset("llama3.1-8b").check_parallel(8, 4)  # the usual 8-GPU layout works


def test_vocab_padding_is_independent_of_tp():
    assert padded_vocab_size(128256) == 128256
    assert padded_vocab_size(500) == 512
    assert all(padded_vocab_size(500) % tp == 0 for tp in (1, 2, 4, 8))


def test_heads_must_divide_into_groups():
    with pytest.raises(MinitronError, match="not divisible"):
        ModelArch(num_attention_heads=6, num_query_groups=4)
