"""Pruning: identity, exact slicing against the HF weights, TP/PP equality, export, errors."""

import json
import os

import pytest
import torch
from conftest import FAMILIES, FAMILY_CASES_CORE, hf_logits, megatron_logits, minitron

from minitron_mcore.checkpoint.megatron import read_meta
from minitron_mcore.importance.scores import Scores

pytestmark = pytest.mark.multiproc


def hand_made_scores(ckpt: str, path: str, seed: int = 0) -> Scores:
    """Random but fixed scores for every site of ``ckpt``'s model."""
    meta = read_meta(ckpt)
    a = meta.arch
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(a.num_layers):
        t[f"layer{i}.heads.mean-l2"] = torch.rand(a.num_attention_heads, generator=g)
        t[f"layer{i}.mlp.mean-l2"] = torch.rand(a.ffn_hidden_size, generator=g)
        t[f"layer{i}.hidden.mean-l2"] = torch.rand(a.hidden_size, generator=g)
    t["layer_bi"] = torch.rand(a.num_layers, generator=g)
    t["layer_loss.block1"] = torch.rand(a.num_layers, generator=g)
    t["layer_loss.block2"] = torch.rand(a.num_layers - 1, generator=g)
    info = {
        "checkpoint_id": meta.checkpoint_id,
        "arch": a.to_dict(),
        "default_agg": "mean-l2",
        "checkpoint": ckpt,
    }
    s = Scores(t, info)
    s.save(path)
    return s


@pytest.fixture(scope="module")
def ckpts(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_src")
    out = {}
    for fam in FAMILIES:
        out[fam] = str(root / fam)
        minitron("import-hf", f"load={hf_models[fam]}", f"save={out[fam]}", "dtype=fp32")
    return out


@pytest.mark.parametrize("family", FAMILY_CASES_CORE)
def test_prune_to_original_size_is_identity(family, ckpts, hf_models, tokens, tmp_path):
    scores = str(tmp_path / "scores")
    hand_made_scores(ckpts[family], scores)
    src = read_meta(ckpts[family]).arch
    out, hf_out = str(tmp_path / "pruned"), str(tmp_path / "hf")
    minitron(
        "prune",
        f"load={ckpts[family]}",
        f"scores={scores}",
        f"save={out}",
        f"prune.target.hidden_size={src.hidden_size}",
        f"prune.target.ffn_hidden_size={src.ffn_hidden_size}",
        f"prune.target.num_attention_heads={src.num_attention_heads}",
        f"prune.target.num_query_groups={src.num_query_groups}",
        f"prune.target.num_layers={src.num_layers}",
    )
    minitron("export-hf", f"load={out}", f"save={hf_out}")
    diff = (hf_logits(hf_out, tokens) - hf_logits(hf_models[family], tokens)).abs().max().item()
    assert diff <= 1e-5, diff


def _reference_slice(hf_sd: dict, plan: dict, arch) -> dict:
    """Slice the original HF weights directly, from the plan, in HF's own layout."""
    d, hpg = arch.kv_channels, arch.heads_per_group
    hid = torch.tensor(plan["hidden"]) if plan["hidden"] else torch.arange(arch.hidden_size)
    out = {
        "model.embed_tokens.weight": hf_sd["model.embed_tokens.weight"][:, hid],
        "model.norm.weight": hf_sd["model.norm.weight"][hid],
    }
    if "lm_head.weight" in hf_sd and not arch.tie_embeddings:
        out["lm_head.weight"] = hf_sd["lm_head.weight"][:, hid]
    for j, (i, lp) in enumerate(zip(plan["kept_layers"], plan["layers"])):
        s, p = f"model.layers.{i}.", f"model.layers.{j}."
        q_heads = [g * hpg + h for g, hs in zip(lp["groups"], lp["heads"]) for h in hs]
        q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in q_heads])
        kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in lp["groups"]])
        n = torch.tensor(lp["neurons"])
        out[p + "self_attn.q_proj.weight"] = hf_sd[s + "self_attn.q_proj.weight"][q_rows][:, hid]
        out[p + "self_attn.k_proj.weight"] = hf_sd[s + "self_attn.k_proj.weight"][kv_rows][:, hid]
        out[p + "self_attn.v_proj.weight"] = hf_sd[s + "self_attn.v_proj.weight"][kv_rows][:, hid]
        if arch.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = hf_sd[s + "self_attn.q_proj.bias"][q_rows]
            out[p + "self_attn.k_proj.bias"] = hf_sd[s + "self_attn.k_proj.bias"][kv_rows]
            out[p + "self_attn.v_proj.bias"] = hf_sd[s + "self_attn.v_proj.bias"][kv_rows]
        out[p + "self_attn.o_proj.weight"] = hf_sd[s + "self_attn.o_proj.weight"][hid][:, q_rows]
        out[p + "mlp.gate_proj.weight"] = hf_sd[s + "mlp.gate_proj.weight"][n][:, hid]
        out[p + "mlp.up_proj.weight"] = hf_sd[s + "mlp.up_proj.weight"][n][:, hid]
        out[p + "mlp.down_proj.weight"] = hf_sd[s + "mlp.down_proj.weight"][hid][:, n]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm + ".weight"] = hf_sd[s + norm + ".weight"][hid]
        for norm in ("self_attn.q_norm", "self_attn.k_norm"):  # Qwen3: over head_dim, kept whole
            if s + norm + ".weight" in hf_sd:
                out[p + norm + ".weight"] = hf_sd[s + norm + ".weight"]
    return out


TARGETS = {
    # divisible by TP=2 and PP=2: 2 groups x 1 head, 2 of 4 layers (best contiguous block)
    "tp": [
        "prune.target.hidden_size=48",
        "prune.target.ffn_hidden_size=64",
        "prune.target.num_attention_heads=2",
        "prune.target.num_layers=2",
    ],
    # heads within groups (2 groups x 1 head), depth via an explicit list
    "heads": [
        "prune.target.hidden_size=40",
        "prune.target.ffn_hidden_size=56",
        "prune.target.num_attention_heads=2",
        "prune.drop_layers=[1]",
    ],
    # whole query groups (1 group x 2 heads), depth via the best contiguous block
    "groups": [
        "prune.target.hidden_size=48",
        "prune.target.ffn_hidden_size=32",
        "prune.target.num_query_groups=1",
        "prune.target.num_attention_heads=2",
        "prune.target.num_layers=2",
    ],
}


@pytest.mark.parametrize(
    "family",
    ["llama", "qwen3", *(pytest.param(f, marks=pytest.mark.slow) for f in ("mistral", "qwen2"))],
)
@pytest.mark.parametrize("target", ["heads", "groups"])
def test_pruning_keeps_exactly_the_expected_weights(
    family, target, ckpts, hf_models, tokens, tmp_path
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    scores = str(tmp_path / "scores")
    hand_made_scores(ckpts[family], scores, seed=3)
    out, hf_out = str(tmp_path / "pruned"), str(tmp_path / "hf")
    minitron("prune", f"load={ckpts[family]}", f"scores={scores}", f"save={out}", *TARGETS[target])
    minitron("export-hf", f"load={out}", f"save={hf_out}")
    plan = read_meta(out).prune_plan
    src = read_meta(ckpts[family]).arch
    original = AutoModelForCausalLM.from_pretrained(hf_models[family]).state_dict()
    want = _reference_slice(original, plan, src)
    got = load_file(os.path.join(hf_out, "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # Plan sanity: every group keeps the same number of heads; ranking followed the scores.
    assert len({len(h) for lp in plan["layers"] for h in lp["heads"]}) == 1
    if target == "groups":
        losses = Scores.load(scores).tensors["layer_loss.block2"]
        start = int(torch.argmin(losses))
        assert plan["dropped_layers"] == [start, start + 1]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_pruned_export_matches_megatron_logits(family, ckpts, tokens, tokens_file, tmp_path):
    scores = str(tmp_path / "scores")
    hand_made_scores(ckpts[family], scores, seed=5)
    out, hf_out = str(tmp_path / "pruned"), str(tmp_path / "hf")
    minitron(
        "prune", f"load={ckpts[family]}", f"scores={scores}", f"save={out}", *TARGETS["groups"]
    )
    minitron("export-hf", f"load={out}", f"save={hf_out}")
    ours = megatron_logits(out, tokens_file, str(tmp_path / "l.st"))
    diff = (hf_logits(hf_out, tokens) - ours).abs().max().item()
    assert diff <= 1e-4, diff


def test_scores_and_pruned_checkpoint_equal_under_tp2_and_pp2(ckpts, corpora, tmp_path):
    from conftest import canonical_weights

    ckpt = ckpts["llama"]
    common = [
        f"load={ckpt}",
        f"data.train=[{corpora['stdlib-code']}]",
        f"data.cache_dir={tmp_path}/cache",
        "importance.num_samples=8",
        "importance.seq_length=32",
        "importance.micro_batch_size=2",
        "importance.layer_loss_samples=4",
        "importance.block_sizes=[1,2]",
    ]
    results = {}
    for name, tp, pp, n in (("tp1", 1, 1, 1), ("tp2", 2, 1, 2), ("pp2", 1, 2, 2), ("dp2", 1, 1, 2)):
        sc, out = str(tmp_path / f"scores_{name}"), str(tmp_path / f"pruned_{name}")
        minitron(
            "importance",
            *common,
            f"save={sc}",
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            nproc=n,
        )
        minitron(
            "prune",
            f"load={ckpt}",
            f"scores={sc}",
            f"save={out}",
            *TARGETS["tp"],
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            nproc=n,
        )
        results[name] = (Scores.load(sc), canonical_weights(out), read_meta(out).prune_plan)
    ref_scores, ref_w, ref_plan = results["tp1"]
    for name in ("tp2", "pp2", "dp2"):
        scores, w, plan = results[name]
        assert set(scores.tensors) == set(ref_scores.tensors)
        for k, v in ref_scores.tensors.items():
            torch.testing.assert_close(scores.tensors[k], v, rtol=1e-4, atol=1e-5, msg=k)
        assert plan["kept_layers"] == ref_plan["kept_layers"]
        assert plan["layers"] == ref_plan["layers"] and plan["hidden"] == ref_plan["hidden"]
        for k in ref_w:
            assert torch.equal(w[k], ref_w[k]), (name, k)


def test_prune_errors(capsys, ckpts, tmp_path):
    from minitron_mcore.cli import main

    ckpt = ckpts["llama"]
    scores = str(tmp_path / "scores")
    hand_made_scores(ckpt, scores)

    def err(*args):
        code = main(["prune", f"load={ckpt}", f"scores={scores}", f"save={tmp_path}/o", *args])
        text = capsys.readouterr().err
        lines = [x for x in text.splitlines() if x.startswith("error:")]
        assert code == 2 and len(lines) == 1, text
        return lines[0]

    assert "not possible" in err("prune.target.hidden_size=65")
    assert "not divisible by num_query_groups" in err("prune.target.num_attention_heads=3")
    assert "parallel.tp=2 does not divide" in err(
        "prune.target.num_query_groups=1", "prune.target.num_attention_heads=1", "parallel.tp=2"
    )
    assert "drop every layer" in err("prune.drop_layers=[0,1,2,3]")
    other = str(tmp_path / "other")
    hand_made_scores(ckpts["mistral"], other)
    code = main(
        [
            "prune",
            f"load={ckpt}",
            f"scores={other}",
            f"save={tmp_path}/o",
            "prune.target.hidden_size=32",
        ]
    )
    text = capsys.readouterr().err
    assert code == 2 and "different checkpoint" in text
    assert not os.path.exists(f"{tmp_path}/o")


def test_recipes_give_the_papers_shapes():
    from minitron_mcore.cli import compose
    from minitron_mcore.models.arch import load_preset
    from minitron_mcore.prune.plan import check_target

    expect = {
        "llama3.1-8b-width": (
            "llama3.1-8b",
            dict(hidden_size=3072, ffn_hidden_size=9216, num_layers=32, num_attention_heads=32),
        ),
        "llama3.1-8b-depth": ("llama3.1-8b", dict(hidden_size=4096, num_layers=16)),
        "mistral-nemo-12b-8b": (
            "mistral-nemo-12b",
            dict(hidden_size=4096, ffn_hidden_size=11520, kv_channels=128),
        ),
    }
    for recipe, (preset, shape) in expect.items():
        cfg = compose("prune", [f"+recipe={recipe}"])
        dst = check_target(load_preset(preset), cfg.prune.target)
        for k, v in shape.items():
            assert getattr(dst, k) == v, (recipe, k)
    # The papers' 4B Llama: ~4.5B parameters including embeddings.
    width = check_target(
        load_preset("llama3.1-8b"), compose("prune", ["+recipe=llama3.1-8b-width"]).prune.target
    )
    assert 4.4e9 < width.num_params() < 4.6e9
    assert json.dumps(width.to_dict())


def test_importance_user_metric(ckpts, corpora, tmp_path):
    sc = str(tmp_path / "scores")
    minitron(
        "importance",
        f"load={ckpts['llama']}",
        f"save={sc}",
        f"data.train=[{corpora['stdlib-code']}]",
        f"data.cache_dir={tmp_path}/cache",
        "importance.num_samples=4",
        "importance.seq_length=32",
        "importance.micro_batch_size=2",
        "importance.layer_loss_samples=2",
        "importance.layer_metric=metric_fns:mean_top_logit",
    )
    user = Scores.load(sc).info["user_metric"]
    assert set(user) == {"full", "0", "1", "2", "3"}
    # Skipping a layer changes the model's outputs, so the metric moves.
    assert all(user[str(i)] != user["full"] for i in range(4))


def test_skipped_layer_equals_dropped_layer(ckpts, tokens, tmp_path):
    """The layer-removal loss skips a layer by shadowing its forward (no compute): the logits
    must equal those of the model `prune` writes with that layer dropped, and the model must
    be itself again afterwards."""
    from minitron_mcore.checkpoint.megatron import load_model
    from minitron_mcore.importance.hooks import skip_layers
    from minitron_mcore.models.forward import forward_logits
    from minitron_mcore.parallel import ParallelConfig, parallel_context

    out = str(tmp_path / "dropped")
    minitron("prune", f"load={ckpts['llama']}", f"save={out}", "prune.drop_layers=[1]")
    with parallel_context(ParallelConfig()):
        model, meta = load_model(ckpts["llama"], use_te=False)
        full = forward_logits(model, tokens, meta.arch)
        with skip_layers(model, {1}):
            skipped = forward_logits(model, tokens, meta.arch)
        again = forward_logits(model, tokens, meta.arch)
        dropped_model, dropped_meta = load_model(out, use_te=False)
        dropped = forward_logits(dropped_model, tokens, dropped_meta.arch)
    assert torch.equal(full, again)
    assert (full - skipped).abs().max().item() > 1e-3
    torch.testing.assert_close(skipped, dropped, rtol=0, atol=1e-5)


def test_layer_losses_from_cached_inputs_equal_full_passes(ckpts, corpora, tmp_path):
    """Restarting the layer-removal passes from cached layer inputs gives the losses of full
    passes with the block skipped (importance.layer_cache_gb=0 turns the cache off)."""
    runs = {}
    for name, gb in (("cached", 8), ("full", 0)):
        out = str(tmp_path / name)
        minitron(
            "importance",
            f"load={ckpts['qwen2']}",
            f"save={out}",
            f"data.train=[{corpora['stdlib-code']}]",
            f"data.cache_dir={tmp_path}/cache",
            "importance.num_samples=4",
            "importance.seq_length=32",
            "importance.micro_batch_size=2",
            "importance.layer_loss_samples=4",
            "importance.block_sizes=[1,2,3]",
            f"importance.layer_cache_gb={gb}",
        )
        runs[name] = Scores.load(out).tensors
    for n in (1, 2, 3):
        key = f"layer_loss.block{n}"
        torch.testing.assert_close(runs["cached"][key], runs["full"][key], rtol=1e-5, atol=1e-6)
        # removing different blocks gives different losses, none the full model's
        assert runs["full"][key].unique().numel() == runs["full"][key].numel()
        assert (runs["full"][key] - runs["full"]["base_loss"]).abs().min() > 1e-4


def test_checkpoints_hold_the_te_specs_norm_names(llama_ckpt):
    """``importance`` scores with the local spec (its norms are modules a hook can see); the
    Transformer Engine spec fuses each norm into the next linear layer. Both read and write the
    same tensors: checkpoints name the norms as the TE spec does (the local spec maps its
    ``input_layernorm`` / ``pre_mlp_layernorm`` onto them), so a checkpoint trained with the TE
    spec on GPUs is scored and pruned through the same names. (The TE spec itself is checked
    on a GPU: tests/gpu.)"""
    from minitron_mcore.checkpoint.megatron import WeightsReader

    names = set(WeightsReader(llama_ckpt).shapes)
    assert {
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        "decoder.final_layernorm.weight",
    } <= names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names), names


# ---------------------------------------------------------------------------- exportable targets
# transformers 5's LlamaConfig refuses a hidden size that is not a multiple of the head count
# (the tiny Llama has 4 heads of 16): prune.target.hidden_size=62 cannot be exported, 60 can.


def _hidden(h: int) -> list[str]:
    return [f"prune.target.hidden_size={h}"]


def _no_weight_reads(*args, **kwargs):
    raise AssertionError("the prune read weights before refusing its target")


def test_prune_refuses_a_target_transformers_cannot_load(capsys, ckpts, tmp_path, monkeypatch):
    """Refused when planned, with the nearest accepted sizes, before a weight is read: by the
    command and by the target check that `minitron pipeline` runs (dry runs included)."""
    from minitron_mcore.cli import main
    from minitron_mcore.errors import MinitronError
    from minitron_mcore.prune.plan import PruneTarget, check_target

    ckpt, scores, out = ckpts["llama"], str(tmp_path / "scores"), str(tmp_path / "o")
    hand_made_scores(ckpt, scores)
    monkeypatch.setattr("minitron_mcore.prune.command.WeightsReader", _no_weight_reads)
    code = main(["prune", f"load={ckpt}", f"scores={scores}", f"save={out}", *_hidden(62)])
    text = capsys.readouterr().err
    lines = [x for x in text.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1, text
    assert "prune.target.hidden_size=62" in lines[0] and "refuses for llama" in lines[0]
    assert lines[0].endswith("nearest accepted: 60 or 64"), lines[0]
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    with pytest.raises(MinitronError, match="nearest accepted: 60 or 64"):
        check_target(read_meta(ckpt).arch, PruneTarget(hidden_size=62))


def test_accepted_neighbour_prunes_exports_and_loads(ckpts, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt, scores = ckpts["llama"], str(tmp_path / "scores")
    hand_made_scores(ckpt, scores)
    out, hf_out = str(tmp_path / "pruned"), str(tmp_path / "hf")
    minitron("prune", f"load={ckpt}", f"scores={scores}", f"save={out}", *_hidden(60))
    minitron("export-hf", f"load={out}", f"save={hf_out}")
    model = AutoModelForCausalLM.from_pretrained(hf_out)
    assert model.config.hidden_size == 60 and model.config.head_dim == 16
    assert torch.isfinite(hf_logits(hf_out, tokens)).all()


# `prune` as it was before its export check: the target check skipped, everything else as is.
_PRUNE_UNCHECKED = (
    "import sys; import minitron_mcore.prune.plan as p; "
    "p.check_exportable = lambda *a, **k: None; "
    "from minitron_mcore.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_export_of_a_refused_config_is_one_error_line(capsys, ckpts, tmp_path):
    """A checkpoint pruned without the check (hidden 62 over 4 heads): export-hf names the key
    and the sizes transformers accepts, exits non-zero and leaves no output behind."""
    from conftest import launch

    from minitron_mcore.cli import main

    ckpt, scores = ckpts["llama"], str(tmp_path / "scores")
    hand_made_scores(ckpt, scores)
    pruned, out = str(tmp_path / "pruned"), str(tmp_path / "hf")
    args = ["prune", f"load={ckpt}", f"scores={scores}", f"save={pruned}", *_hidden(62)]
    launch(["-c", _PRUNE_UNCHECKED, *args])
    assert read_meta(pruned).arch.hidden_size == 62
    code = main(["export-hf", f"load={pruned}", f"save={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "the key that is wrong: hidden_size=62 (nearest accepted: 60 or 64)" in err, err
    assert "prune.target.hidden_size" in err, err
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
