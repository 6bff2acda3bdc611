"""config.json written by ``export-hf``: both RoPE layouts (transformers 5's ``rope_parameters``
and the classic ``rope_theta`` / ``rope_scaling`` that vLLM, TensorRT-LLM and llama.cpp read),
equal to the source model's, and a ``sliding_window`` that keeps Mistral at full attention."""

import json
import os
import shutil

import pytest
from conftest import hf_logits, minitron


def _read(hf_dir: str) -> dict:
    with open(os.path.join(hf_dir, "config.json")) as f:
        return json.load(f)


def _hub_layout_copy(src: str, dst: str) -> str:
    """``src`` with its config.json in the transformers-4 layout that Hub checkpoints such as
    Llama-3.1-8B and Qwen2.5 ship: ``rope_theta`` + ``rope_scaling``, no ``rope_parameters``."""
    shutil.copytree(src, dst)
    cfg = _read(dst)
    params = cfg.pop("rope_parameters")
    theta = params.pop("rope_theta")
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = None if params["rope_type"] == "default" else params
    cfg["transformers_version"] = "4.56.0"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return dst


def _source_rope(cfg: dict) -> tuple:
    """(rope_theta, rope_scaling) as the source config.json states them, in either layout."""
    if "rope_theta" in cfg:
        return cfg["rope_theta"], cfg.get("rope_scaling")
    params = dict(cfg["rope_parameters"])
    theta = params.pop("rope_theta")
    return theta, None if params["rope_type"] == "default" else params


def _roundtrip(src: str, tmp_path) -> str:
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    minitron("import-hf", f"load={src}", f"save={ckpt}", "dtype=fp32")
    minitron("export-hf", f"load={ckpt}", f"save={out}")
    return out


@pytest.mark.parametrize(
    "family,layout", [("llama", "hub"), ("qwen2", "hub"), ("llama", "fixture")]
)
def test_export_writes_classic_and_v5_rope_keys_equal_to_source(
    family, layout, hf_models, tokens, tmp_path
):
    src = hf_models[family]
    if layout == "hub":
        src = _hub_layout_copy(src, str(tmp_path / "src"))
    theta, scaling = _source_rope(_read(src))
    out = _roundtrip(src, tmp_path)
    cfg = _read(out)

    assert "rope_theta" in cfg and "rope_scaling" in cfg, sorted(cfg)
    assert isinstance(cfg["rope_theta"], float)
    assert cfg["rope_theta"] == theta
    assert cfg["rope_scaling"] == scaling
    if family == "llama":  # Llama-3.1 style: theta 500000 with llama3 scaling
        assert theta == 500000.0 and scaling["rope_type"] == "llama3"
    assert cfg["rope_parameters"] == dict(scaling or {"rope_type": "default"}, rope_theta=theta)

    # Stock transformers reads the exported directory with the source's RoPE and logits.
    from transformers import AutoConfig

    assert (
        AutoConfig.from_pretrained(out).rope_parameters
        == AutoConfig.from_pretrained(src).rope_parameters
    )
    diff = (hf_logits(out, tokens) - hf_logits(src, tokens)).abs().max().item()
    assert diff <= 1e-5, f"{family}: exported model differs from the source by {diff}"


@pytest.mark.parametrize("window", [None, 2048])
def test_mistral_export_keeps_full_attention_sliding_window(
    window, hf_models, tokenizer_dir, tokens, tmp_path
):
    """A window that is null or covers max_position_embeddings (2048 here) is full attention;
    the export writes the source's value back, never transformers' default of 4096."""
    from minitron_mcore.testing.hf_models import make_hf_model

    src = hf_models["mistral"]
    if window is not None:
        src = make_hf_model(
            "mistral", str(tmp_path / "src"), tokenizer_dir=tokenizer_dir, sliding_window=window
        )
    assert _read(src)["sliding_window"] == window
    out = _roundtrip(src, tmp_path)
    assert _read(out)["sliding_window"] == window

    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).sliding_window == window
    diff = (hf_logits(out, tokens) - hf_logits(src, tokens)).abs().max().item()
    assert diff <= 1e-5, f"mistral window={window}: exported model differs by {diff}"


def test_what_transformers_accepts_is_asked_of_transformers():
    """The export check builds the config export-hf writes and lets transformers judge it:
    Llama refuses a hidden size that is not a multiple of its heads (even with head_dim
    given), Mistral and Qwen2 (which have no such rule in transformers 5) follow transformers'
    own verdict; the refused size is found with its nearest accepted values."""
    from transformers import AutoConfig

    from minitron_mcore.checkpoint import hf_io
    from minitron_mcore.checkpoint.hf_mapping import (
        export_refusal,
        hf_config_from_arch,
        refused_size,
    )
    from minitron_mcore.models.arch import ModelArch

    llama = ModelArch(hidden_size=576, num_attention_heads=9, num_query_groups=3)
    assert export_refusal(llama, None) is None
    assert "not a multiple" in export_refusal(llama.replace(hidden_size=448), None)
    assert refused_size(llama.replace(hidden_size=448), None) == ("hidden_size", [441, 450])
    for family in ("mistral", "qwen2"):
        arch = llama.replace(family=family, hidden_size=448)
        cfg = hf_config_from_arch(arch, None, "fp32")
        try:
            AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            verdict = None
        except Exception as e:  # whatever this transformers refuses with
            verdict = e
        assert (export_refusal(arch, None) is None) == (verdict is None), family
    assert "no causal LM" in hf_io.hf_config_refusal({"model_type": "no-such-family"})


def test_nearest_accepted_looks_both_ways_within_bounds():
    from minitron_mcore.checkpoint.hf_mapping import nearest_accepted

    def multiple_of_9(v):
        return v % 9 == 0

    assert nearest_accepted(448, multiple_of_9, 1, 576) == [441, 450]
    assert nearest_accepted(448, multiple_of_9, 1, 449) == [441]  # nothing above within hi
    assert nearest_accepted(448, multiple_of_9, 445, 449) == []
    assert nearest_accepted(448, multiple_of_9, 1, 576, reach=5) == [450]
    assert nearest_accepted(450, multiple_of_9, 1, 576) == [441, 459]  # the value itself: no
