"""Mixture-of-experts families (Mixtral, Qwen3-MoE): Hugging Face <-> Megatron ``MoELayer`` exact at
every layout - tensor, pipeline and expert parallel (tokens dispatched all-to-all over gloo) -
against ``transformers`` on tiny random models made here."""

import os

import pytest
import torch
from conftest import WORKERS, hf_logits, launch, minitron

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


def test_moe_checks(moe_models, tmp_path):
    """What cannot run yet says so in one line."""
    _, ckpt = moe_models
    r = minitron("prune", f"load={ckpt['mixtral']}", f"save={tmp_path}/p", check=False)
    assert r.returncode == 2 and "mixture-of-experts" in r.stderr.strip().splitlines()[-1]
    assert not os.path.exists(f"{tmp_path}/p")


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
