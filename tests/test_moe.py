"""Mixture-of-experts families (Mixtral, Qwen3-MoE): Hugging Face <-> Megatron ``MoELayer`` exact at
every layout - tensor, pipeline and expert parallel (tokens dispatched all-to-all over gloo) -
against ``transformers`` on tiny random models made here."""

import os

import pytest
import torch
from conftest import WORKERS, hf_logits, launch, megatron_logits, minitron

pytestmark = pytest.mark.multiproc

MOE = ["mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def moe_models(tokenizer_dir, tmp_path_factory):
    from minitron_mcore.testing.hf_models import make_hf_model

    root = tmp_path_factory.mktemp("moe")
    hf = {f: make_hf_model(f, str(root / f), seed=7, tokenizer_dir=tokenizer_dir) for f in MOE}
    ckpt = {}
    for f in MOE:
        ckpt[f] = str(root / f"ckpt_{f}")
        minitron("import-hf", f"load={hf[f]}", f"save={ckpt[f]}", "dtype=fp32")
    return hf, ckpt


def _logits(ckpt, tokens_file, out, tp, pp, ep):
    from safetensors.torch import load_file

    args = [os.path.join(WORKERS, "logits.py"), ckpt, tokens_file, out, str(tp), str(pp)]
    launch(args, nproc=tp * pp * ep, env={"MINITRON_TEST_EP": str(ep)})
    return load_file(out)["logits"]


LAYOUTS = [
    (2, 1, 2),  # TP=2 x EP=2: experts split over 2 ranks, each expert's FFN over 2
    pytest.param(1, 1, 1, marks=pytest.mark.slow),
    pytest.param(2, 1, 1, marks=pytest.mark.slow),
    pytest.param(1, 2, 1, marks=pytest.mark.slow),
    pytest.param(1, 1, 2, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("tp,pp,ep", LAYOUTS)
@pytest.mark.parametrize("family", MOE)
def test_moe_logits_match_transformers(
    family, tp, pp, ep, moe_models, tokens, tokens_file, tmp_path
):
    hf, ckpt = moe_models
    ref = hf_logits(hf[family], tokens)
    ours = _logits(ckpt[family], tokens_file, str(tmp_path / "l.st"), tp, pp, ep)
    diff = (ours - ref).abs().max().item()
    assert ours.shape == ref.shape and diff <= 1e-5, f"{family} TP={tp} PP={pp} EP={ep}: {diff}"


@pytest.mark.slow  # ~30 s
def test_moe_import_at_tp2_ep2_exports_the_same_weights(moe_models, tmp_path):
    """Imported by 4 processes at TP=2 x EP=2 (each writes its experts' shards), exported by
    one: every tensor equals the source's, and transformers counts our parameters."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from minitron_mcore.checkpoint.megatron import read_meta

    hf, _ = moe_models
    for family in MOE:
        ckpt, out = str(tmp_path / f"c_{family}"), str(tmp_path / f"hf_{family}")
        minitron(
            "import-hf",
            f"load={hf[family]}",
            f"save={ckpt}",
            "dtype=fp32",
            "parallel.tp=2",
            "parallel.ep=2",
            nproc=4,
        )
        minitron("export-hf", f"load={ckpt}", f"save={out}")
        src = load_file(os.path.join(hf[family], "model.safetensors"))
        got = load_file(os.path.join(out, "model.safetensors"))
        assert set(got) == set(src), family
        for k in src:
            assert torch.equal(got[k], src[k]), (family, k)
        model = AutoModelForCausalLM.from_pretrained(out)
        assert read_meta(ckpt).arch.num_params() == sum(p.numel() for p in model.parameters())


def test_moe_prune_checks(capsys, moe_models, tmp_path):
    """Targets a mixture of experts cannot take say so in one line, before any work."""
    from minitron_mcore.cli import main

    _, ckpt = moe_models
    cases = [
        ("prune.target.num_moe_experts=1", "keep at least 2 experts"),
        ("prune.target.num_moe_experts=8", "prune.target.num_moe_experts=8 is not possible"),
        ("prune.target.ffn_hidden_size=16", "prune.target.moe_ffn_hidden_size"),
        ("prune.expert_metric=random", "prune.expert_metric='random'"),
        ("prune.target.moe_router_topk=1", "keep moe_router_topk >= 2"),
    ]
    for override, words in cases:
        out = str(tmp_path / "p")
        args = ["prune", f"load={ckpt['mixtral']}", f"save={out}", override]
        assert main(args + ["prune.drop_layers=[1]"]) == 2, override
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert words in last, (override, last)
        assert not os.path.exists(out)


MOE_TARGET = [
    "prune.target.num_moe_experts=2",
    "prune.target.moe_ffn_hidden_size=16",
    "prune.target.hidden_size=48",
    "prune.target.num_layers=2",
]


def _score_and_prune(ckpt, corpus, root, tp=1, pp=1, ep=1):
    """``importance`` then ``prune`` (experts, expert width, hidden, depth) at one layout:
    (scores, prune plan, pruned weights, pruned checkpoint)."""
    from conftest import canonical_weights

    from minitron_mcore.checkpoint.megatron import read_meta
    from minitron_mcore.importance.scores import Scores

    layout = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}"]
    sc, pruned = f"{root}/scores", f"{root}/pruned"
    minitron(
        "importance",
        f"load={ckpt}",
        f"save={sc}",
        f"data.train=[{corpus}]",
        f"data.cache_dir={root}/cache",
        "importance.num_samples=8",
        "importance.seq_length=32",
        "importance.micro_batch_size=2",
        "importance.layer_loss_samples=4",
        "importance.block_sizes=[1,2]",
        *layout,
        nproc=tp * pp * ep,
    )
    minitron(
        "prune",
        f"load={ckpt}",
        f"scores={sc}",
        f"save={pruned}",
        *MOE_TARGET,
        *layout,
        nproc=tp * pp * ep,
    )
    return Scores.load(sc), read_meta(pruned).prune_plan, canonical_weights(pruned), pruned


@pytest.fixture(scope="module")
def moe_reference(moe_models, corpora, tmp_path_factory):
    """Per family, computed once when first asked: the one-process scores and pruned model."""
    done = {}

    def get(family):
        if family not in done:
            root = str(tmp_path_factory.mktemp(f"ref_{family}"))
            done[family] = _score_and_prune(moe_models[1][family], corpora["stdlib-code"], root)
        return done[family]

    return get


@pytest.mark.parametrize(
    "family,tp,pp,ep",
    [
        ("qwen3_moe", 2, 1, 2),  # 4 processes: each expert's FFN over 2 ranks, experts over 2
        pytest.param("qwen3_moe", 1, 1, 2, marks=pytest.mark.slow),
        pytest.param("qwen3_moe", 2, 1, 1, marks=pytest.mark.slow),
        pytest.param("qwen3_moe", 1, 2, 1, marks=pytest.mark.slow),
        pytest.param("mixtral", 2, 1, 2, marks=pytest.mark.slow),
    ],
)
def test_moe_importance_and_pruning_equal_across_layouts(
    family, tp, pp, ep, moe_models, moe_reference, corpora, tmp_path
):
    """Expert scores and the pruned model at TP/PP/EP equal one process's: every score within
    1e-4, the same kept layers, experts, neurons, channels and heads, bitwise equal weights."""
    ref_s, ref_plan, ref_w, _ = moe_reference(family)
    s, plan, w, _ = _score_and_prune(
        moe_models[1][family], corpora["stdlib-code"], str(tmp_path), tp, pp, ep
    )
    assert set(s.tensors) == set(ref_s.tensors)
    for k, v in ref_s.tensors.items():
        torch.testing.assert_close(s.tensors[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert plan["layers"] == ref_plan["layers"] and plan["hidden"] == ref_plan["hidden"]
    assert plan["kept_layers"] == ref_plan["kept_layers"]
    assert set(w) == set(ref_w)
    for k in ref_w:
        assert torch.equal(w[k], ref_w[k]), k


def test_moe_pruned_by_expert_exports_and_loads(moe_reference, tokens, tokens_file, tmp_path):
    """The scores have every expert site; the kept experts are the top-scored ones; the pruned
    Qwen3-MoE (2 of 4 experts, experts 32 -> 16 wide, hidden 64 -> 48, 2 of 4 layers) exports
    to a config transformers loads, with our logits."""
    scores, plan, _, pruned = moe_reference("qwen3_moe")
    assert scores.tensors["layer0.experts.score"].shape == (4,)
    assert scores.tensors["layer0.expert_mlp.mean-l2"].shape == (4, 32)
    freq = scores.tensors["layer1.experts.frequency"]  # top-2 routing: shares of routings
    assert abs(freq.sum().item() - 1) < 1e-5 and (freq > 0).all()
    assert len(plan["kept_layers"]) == 2
    for new, layer in enumerate(plan["kept_layers"]):
        score = scores.tensors[f"layer{layer}.experts.score"]
        kept = plan["layers"][new]["experts"]
        dropped = sorted(set(range(4)) - set(kept))
        assert len(kept) == 2 and score[dropped].max() < score[kept].min()
    hf_out = str(tmp_path / "hf")
    minitron("export-hf", f"load={pruned}", f"save={hf_out}")
    ours = megatron_logits(pruned, tokens_file, str(tmp_path / "l.st"))
    diff = (hf_logits(hf_out, tokens) - ours).abs().max().item()
    assert diff <= 1e-5, diff


def test_expert_plans_follow_the_chosen_ranking():
    """prune.expert_metric picks the ranking; per_expert neurons follow each expert's own
    scores, shared ones the sum over the kept experts."""
    from minitron_mcore.importance.scores import Scores
    from minitron_mcore.models.arch import load_preset
    from minitron_mcore.prune.plan import PruneConfig, PruneTarget, make_plan

    src = load_preset("tiny-qwen3-moe").replace(num_layers=1)  # 8 experts, 32 wide
    g = torch.Generator().manual_seed(0)
    t = {
        "layer0.heads.mean-l2": torch.rand(4, generator=g),
        "layer0.hidden.mean-l2": torch.rand(64, generator=g),
        "layer0.experts.score": torch.tensor([8.0, 1, 7, 2, 6, 3, 5, 4]),
        "layer0.experts.frequency": torch.tensor([1.0, 8, 2, 7, 3, 6, 4, 5]),
        "layer0.experts.prob": torch.rand(8, generator=g),
        "layer0.expert_mlp.mean-l2": torch.rand(8, 32, generator=g),
    }
    scores = Scores(t, {"default_agg": "mean-l2"})
    target = PruneTarget(num_moe_experts=4, moe_ffn_hidden_size=8)
    per = make_plan(src, PruneConfig(target=target), scores).layers[0]
    assert per.experts == [0, 2, 4, 6]
    for e, neurons in zip(per.experts, per.expert_neurons):
        assert neurons == sorted(t["layer0.expert_mlp.mean-l2"][e].topk(8).indices.tolist())
    freq = make_plan(src, PruneConfig(target=target, expert_metric="frequency"), scores)
    assert freq.layers[0].experts == [1, 3, 5, 7]
    shared = make_plan(src, PruneConfig(target=target, moe_neurons="shared"), scores).layers[0]
    want = sorted(t["layer0.expert_mlp.mean-l2"][[0, 2, 4, 6]].sum(0).topk(8).indices.tolist())
    assert shared.expert_neurons == [want] * 4
    assert make_plan(src, PruneConfig(target=target), scores).dst.num_params() < src.num_params()


@pytest.mark.slow
def test_moe_expert_parallel_size_must_divide_the_experts(moe_models, tmp_path):
    """An EP size that does not divide the experts is refused before any work."""
    r = minitron(
        "import-hf",
        f"load={moe_models[0]['mixtral']}",
        f"save={tmp_path}/c",
        "parallel.ep=3",
        nproc=3,
        check=False,
    )
    assert r.returncode != 0 and "parallel.ep=3 does not divide num_moe_experts=4" in r.stderr
    assert not os.path.exists(f"{tmp_path}/c")


def _train(command, ckpt, save, ep, *extra):
    from conftest import read_log

    minitron(
        command,
        f"load={ckpt}",
        f"save={save}",
        "data.train=[demo:stdlib-code]",
        f"data.cache_dir={os.path.dirname(save)}/cache",
        "train.steps=2",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.seq_length=64",
        "train.eval_iters=0",
        "train.precision=fp32",
        "train.log_interval=1",
        f"parallel.ep={ep}",
        *extra,
        nproc=ep,
    )
    rows = [r for r in read_log(save + ".logs/train_log.jsonl") if "train/loss" in r]
    return [(r["train/loss"], r["train/grad_norm"]) for r in rows]


def _same_run(a, b, wa, wb):
    for (loss, gn), (rloss, rgn) in zip(a, b):
        assert abs(loss - rloss) <= 1e-5 * rloss and abs(gn - rgn) <= 1e-4 * rgn, (a, b)
    for k in wa:
        assert (wb[k] - wa[k]).abs().max() <= 1e-4 * wa[k].abs().max(), k


def test_moe_training_at_ep2_equals_ep1(moe_models, tmp_path):
    """Two training steps of a Qwen3-MoE at EP=2 (experts split over the ranks, the rest data
    parallel) follow EP=1: losses, grad norms and every weight. It failed before the experts'
    weights were marked expert-parallel (Megatron reads expert_model_parallel_size from the
    model's config, not from the process groups): DDP summed different experts' gradients."""
    from conftest import canonical_weights

    _, ckpt = moe_models
    runs = {
        ep: _train("correct", ckpt["qwen3_moe"], str(tmp_path / f"ep{ep}"), ep) for ep in (1, 2)
    }
    _same_run(
        runs[1],
        runs[2],
        canonical_weights(str(tmp_path / "ep1")),
        canonical_weights(str(tmp_path / "ep2")),
    )


@pytest.mark.slow
def test_moe_distillation_at_ep2_equals_ep1(moe_models, tmp_path):
    """An MoE teacher (Mixtral, trained briefly here) distils an MoE student (Qwen3-MoE) at EP=2
    as at EP=1; and into a dense student."""
    from conftest import canonical_weights

    _, ckpt = moe_models
    teacher = str(tmp_path / "teacher")
    minitron(
        "correct",
        f"load={ckpt['mixtral']}",
        f"save={teacher}",
        "data.train=[demo:stdlib-code]",
        f"data.cache_dir={tmp_path}/cache",
        "train.steps=80",
        "train.lr=3e-3",
        "train.warmup_steps=5",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.seq_length=64",
        "train.eval_iters=1",
    )
    runs = {
        ep: _train(
            "distill", ckpt["qwen3_moe"], str(tmp_path / f"kd{ep}"), ep, f"teacher={teacher}"
        )
        for ep in (1, 2)
    }
    _same_run(
        runs[1],
        runs[2],
        canonical_weights(str(tmp_path / "kd1")),
        canonical_weights(str(tmp_path / "kd2")),
    )
