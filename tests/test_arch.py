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
        ("qwen3-0.6b", 596_049_920),
        ("qwen3-8b", 8_190_735_360),
        ("mixtral-8x7b", 46_702_792_704),
        ("qwen3-30b-a3b", 30_532_122_624),
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


@pytest.mark.parametrize("name", [n for n in preset_names() if n.startswith("qwen3")])
def test_qwen3_presets_count_what_transformers_builds(name):
    """Qwen3's per-head query/key norms included: our count equals the parameters
    transformers builds for the exported config (on the meta device, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = load_preset(name)
    cfg = dict(hf_config_from_arch(arch, None, "bf16"))
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert arch.qk_norm and arch.kv_channels == 128
    assert arch.num_params() == sum(p.numel() for p in model.parameters())


def test_qwen3_recipe_follows_the_papers_parameter_rule():
    """conf/recipe/qwen3-8b-to-4b.yaml: the student keeps the share of its teacher's parameters
    that Llama-3.1-Minitron-4B-Width keeps of Llama-3.1-8B, to the nearest FFN multiple of 128."""
    import os

    import yaml

    from minitron_mcore.utils.config import conf_dir

    with open(os.path.join(conf_dir(), "recipe", "qwen3-8b-to-4b.yaml")) as f:
        target = yaml.safe_load(f)["students"][0]["target"]
    llama = load_preset("llama3.1-8b")
    share = llama.replace(hidden_size=3072, ffn_hidden_size=9216).num_params() / llama.num_params()
    qwen = load_preset("qwen3-8b")
    assert target["hidden_size"] == qwen.hidden_size * 3 // 4

    def miss(ffn: int) -> float:
        student = qwen.replace(hidden_size=target["hidden_size"], ffn_hidden_size=ffn)
        return abs(student.num_params() / qwen.num_params() - share)

    best = min(range(128, qwen.ffn_hidden_size, 128), key=miss)
    assert target["ffn_hidden_size"] == best and miss(best) < 0.005
