"""`minitron distill` end to end: sharded steps equal the unsharded one (teacher wider and deeper
than the student), the checks before training, and exact resume after SIGKILL."""

import json
import os
import re
import time

import pytest
import torch
from conftest import canonical_weights, minitron, read_log, run_and_kill_when

from minitron_mcore.train.state import read_train_state

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def teacher(tokenizer_dir, corpora, tmp_path_factory):
    """A 4-layer Llama trained briefly on stdlib code (a teacher must beat a uniform guess)."""
    save = str(tmp_path_factory.mktemp("kd") / "teacher")
    minitron(
        "pretrain",
        "model=tiny-llama",
        f"tokenizer={tokenizer_dir}",
        f"save={save}",
        f"data.train=[{corpora['stdlib-code']}]",
        "train.steps=40",
        "train.seq_length=64",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.lr=3e-3",
        "train.warmup_steps=4",
        "train.eval_iters=0",
    )
    return save


@pytest.fixture(scope="module")
def student(teacher, corpora, tmp_path_factory):
    """Pruned from the teacher in width (hidden 64->48, ffn 96->64) and depth (4->2 layers)."""
    root = tmp_path_factory.mktemp("kd_student")
    scores, save = str(root / "scores"), str(root / "student")
    minitron(
        "importance",
        f"load={teacher}",
        f"save={scores}",
        f"data.train=[{corpora['stdlib-code']}]",
        "importance.num_samples=8",
        "importance.seq_length=64",
        "importance.layer_loss_samples=4",
    )
    minitron(
        "prune",
        f"load={teacher}",
        f"scores={scores}",
        f"save={save}",
        "prune.target.hidden_size=48",
        "prune.target.ffn_hidden_size=64",
        "prune.drop_layers=[1,2]",  # kept [0, 3]: at PP=2 each stage pairs with its teacher part
    )
    return save


def _distill_args(student, teacher, data, save, steps, *extra):
    return [
        "distill",
        f"load={student}",
        f"teacher={teacher}",
        f"save={save}",
        f"data.train=[{data}]",
        f"train.steps={steps}",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.seq_length=64",
        "train.eval_iters=0",
        "train.precision=fp32",
        "distill.chunk_tokens=48",
        *extra,
    ]


def _one_step(student, teacher, data, save, tp=1, pp=1, nproc=1, extra=()):
    args = _distill_args(student, teacher, data, save, 1, *extra)
    minitron(*args, f"parallel.tp={tp}", f"parallel.pp={pp}", nproc=nproc)
    (row,) = [r for r in read_log(save + ".logs/train_log.jsonl") if "train/loss" in r]
    return row, canonical_weights(save)


@pytest.fixture(scope="module")
def reference_steps(student, teacher, corpora, tmp_path_factory):
    """The unsharded step, per set of distill.* options (computed once each)."""
    cache = {}

    def get(options):
        if options not in cache:
            save = str(tmp_path_factory.mktemp("kd_ref") / "out")
            cache[options] = _one_step(
                student, teacher, corpora["stdlib-code"], save, extra=options
            )
        return cache[options]

    return get


HIDDEN = ("distill.intermediate_weight=0.5",)


@pytest.mark.parametrize(
    "tp,pp,nproc,extra,options",
    [
        (2, 1, 2, (), ()),
        (1, 2, 2, (), ()),
        (1, 1, 2, ("train.distributed_optimizer=true",), ()),
        (2, 2, 4, (), ()),
        (2, 1, 2, (), HIDDEN),
        (1, 2, 2, (), HIDDEN + ("distill.intermediate_layers=[1]",)),
    ],
    ids=["tp2", "pp2", "dp2-distopt", "tp2-pp2", "tp2-hidden", "pp2-hidden"],
)
def test_sharded_step_equals_unsharded(
    student, teacher, corpora, reference_steps, tmp_path, tp, pp, nproc, extra, options
):
    ref_row, ref_w = reference_steps(options)
    row, w = _one_step(
        student,
        teacher,
        corpora["stdlib-code"],
        str(tmp_path / "out"),
        tp,
        pp,
        nproc,
        extra + options,
    )
    keys = ["train/loss", "train/lm_loss", "train/grad_norm"]
    keys += ["train/hidden_loss"] if options else []
    for key in keys:
        assert abs(row[key] - ref_row[key]) / abs(ref_row[key]) <= 1e-4, (key, row, ref_row)
    assert ref_row["train/loss"] > 0 and ref_w.keys() == w.keys()
    for k in ref_w:
        rel = (w[k] - ref_w[k]).abs().max() / ref_w[k].abs().max()
        assert rel <= 1e-4, (k, rel.item())


def _steps(student, teacher, data, save, steps, tp, nproc, extra=()):
    args = _distill_args(student, teacher, data, save, steps, *extra)
    minitron(*args, f"parallel.tp={tp}", nproc=nproc)
    rows = [r for r in read_log(save + ".logs/train_log.jsonl") if "train/loss" in r]
    return rows, canonical_weights(save)


def test_sequence_parallel_equals_plain_tensor_parallel(student, teacher, corpora, tmp_path):
    """TP=2 with sequence parallelism (both models' hidden states split over the sequence:
    the KD loss and the hidden-state loss gather them) equals TP=2 without it: every step's
    losses and gradient norm, and the weights after 3 steps (rel <= 1e-5)."""
    data = corpora["stdlib-code"]
    runs = {
        sp: _steps(
            student,
            teacher,
            data,
            str(tmp_path / f"sp-{sp}"),
            3,
            2,
            2,
            HIDDEN + (f"parallel.sequence_parallel={sp}",),
        )
        for sp in ("false", "true")
    }
    (rows, w), (sp_rows, sp_w) = runs.values()
    assert len(rows) == len(sp_rows) == 3
    for row, sp_row in zip(rows, sp_rows):
        for key in ("train/loss", "train/lm_loss", "train/hidden_loss", "train/grad_norm"):
            assert abs(sp_row[key] - row[key]) <= 1e-5 * abs(row[key]), (key, row, sp_row)
    for k in w:
        assert (sp_w[k] - w[k]).abs().max() <= 1e-5 * w[k].abs().max(), k
    assert any((w[k] != canonical_weights(student)[k]).any() for k in w)  # it trained


def test_distillation_lowers_kd_loss_and_keeps_the_student_shape(
    student, teacher, corpora, tmp_path
):
    save = str(tmp_path / "kd")
    r = minitron(
        *_distill_args(student, teacher, corpora["stdlib-code"], save, 12),
        "train.eval_iters=2",
        "train.eval_interval=6",
    )
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["pruned_from_teacher"] is True
    assert m["teacher_valid_loss"] < m["valid_lm_loss"]  # the teacher is the better model
    assert m["valid_kd_loss"] < 0.7 * m["initial_valid_loss"], m
    logged = read_log(save + ".logs/train_log.jsonl")
    assert any("valid/teacher_lm_loss" in x for x in logged)
    assert all("train/lm_loss" in x for x in logged if "train/loss" in x)
    with open(os.path.join(save, "minitron.json")) as f:
        assert json.load(f)["arch"]["hidden_size"] == 48


def _one_error(r):
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_checks_before_training(student, teacher, llama_ckpt, corpora, tmp_path):
    from minitron_mcore.testing.hf_models import make_tokenizer

    data = corpora["stdlib-code"]

    def error_of(teacher_ckpt, save, *extra):
        args = _distill_args(student, teacher_ckpt, data, f"{tmp_path}/{save}", 2, *extra)
        return _one_error(minitron(*args, check=False))

    # an untrained teacher (the random tiny Llama): its loss is not below log(V)
    err = error_of(llama_ckpt, "a")
    assert "log(vocab)" in err and "teacher=" in err
    # a layout that does not split the models (2 query groups, TP=4)
    assert "parallel.tp=4" in error_of(teacher, "b", "parallel.tp=4")
    # a teacher with another tokenizer
    other = make_tokenizer(str(tmp_path / "tok2"), vocab_size=300)
    minitron(
        "pretrain",
        "model=tiny-llama",
        f"tokenizer={other}",
        f"save={tmp_path}/t2",
        "data.train=[demo:stdlib-docs]",  # tokenized with its own tokenizer
        "train.steps=1",
        "train.warmup_steps=0",
        "train.seq_length=32",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "train.eval_iters=0",
        f"data.cache_dir={tmp_path}/cache",
    )
    assert "tokenizer" in error_of(f"{tmp_path}/t2", "c")
    for d in "abc":
        assert not os.path.exists(f"{tmp_path}/{d}")


def test_hidden_loss_pair_off_the_last_stage_is_one_error_on_every_rank(
    student, teacher, corpora, tmp_path
):
    """At PP=2 a hidden-state pair on the first stage is refused with one error line; the
    ranks decide it together (before: the last stage raised alone while the first waited in
    a collective - a connection error under gloo, the collective timeout under NCCL)."""
    save = str(tmp_path / "out")
    args = _distill_args(student, teacher, corpora["stdlib-code"], save, 2, *HIDDEN)
    r = minitron(*args, "distill.intermediate_layers=[0]", "parallel.pp=2", nproc=2, check=False)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert "pipeline stage" in errors[0], errors
    assert "[rank" not in r.stderr, r.stderr[-3000:]  # no worker traceback (torchrun's own aside)
    assert not os.path.exists(save)


@pytest.mark.slow  # ~1 min: three TP=2 runs (CI time); python3 -m pytest -q -m slow
def test_launcher_killed_workers_stop_and_the_rerun_refuses_or_resumes(
    student, teacher, corpora, tmp_path
):
    """TP=2: torchrun alone is SIGKILLed at a random moment after the first checkpoint; its
    workers (in sessions of their own) notice, save at the next step and exit. The same
    command started at once either refuses with the lock's error (the old workers still
    write) or resumes; run again once they are gone, it finishes, equal to an uninterrupted
    run bitwise."""
    import random
    import subprocess
    import sys

    import psutil
    from conftest import ROOT, _env, _free_port

    data, tp = corpora["stdlib-code"], ("parallel.tp=2",)
    straight = str(tmp_path / "straight")
    minitron(*_distill_args(student, teacher, data, straight, 8, *tp), nproc=2)
    save = str(tmp_path / "out")
    args = _distill_args(student, teacher, data, save, 8, "train.save_interval=2", *tp)
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher = subprocess.Popen(
        [*run, "--master-port", str(_free_port()), "-m", "minitron_mcore", *args],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(save, "minitron.json")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(15).uniform(0.0, 1.5))
    workers = psutil.Process(launcher.pid).children(recursive=True)
    launcher.kill()
    launcher.wait()
    again = minitron(*args, nproc=2, check=False)
    gone, alive = psutil.wait_procs(workers, timeout=120)
    assert not alive, "the launcher's workers kept running"
    if again.returncode != 0:  # refused: the old workers still held save=
        errors = [x for x in again.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and "is being written by another run" in errors[0], again.stderr
        with open(os.path.join(save, "metrics.json")) as f:
            stopped = json.load(f)  # what the old workers reported when they stopped
        assert stopped["preempted"] and stopped["step"] < 8, stopped
        minitron(*args, nproc=2)
    else:  # the old workers had stopped already: it resumed where they had saved
        m = re.search(r"resumed \S+ at step (\d+)/8", again.stderr)
        assert m and int(m.group(1)) < 8, again.stderr[-3000:]
    assert read_train_state(save)["iteration"] == 8
    a, b = canonical_weights(straight), canonical_weights(save)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_run_resumes_bitwise(student, teacher, corpora, tmp_path):
    data = corpora["stdlib-code"]
    straight = str(tmp_path / "straight")
    minitron(*_distill_args(student, teacher, data, straight, 8))
    resumed = str(tmp_path / "resumed")
    args = _distill_args(student, teacher, data, resumed, 8, "train.save_interval=4")
    # minitron.json (the tracker) appears once the first checkpoint is complete
    run_and_kill_when(args, os.path.join(resumed, "minitron.json"))
    assert read_train_state(resumed)["iteration"] == 4, "the run was not stopped mid-way"
    minitron(*args)
    assert read_train_state(resumed)["iteration"] == 8
    a, b = canonical_weights(straight), canonical_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tp", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_teacher_with_a_differently_padded_vocabulary(teacher, student, corpora, tmp_path, tp):
    """One tokenizer, output layers of different sizes (Qwen2.5-Coder-7B has 152064 rows, the
    0.5B 151936): the teacher, exported, its embedding and output layer grown by 128 rows of
    noise past the tokenizer and imported again, distils the student exactly as the original
    does - at TP=2, where the two models' vocabulary slices start at other ids (and TP=1). The
    KD loss runs over the tokenizer's vocabulary; a teacher with another tokenizer is refused."""
    from transformers import AutoModelForCausalLM

    from minitron_mcore.checkpoint.megatron import read_meta

    hf, big = str(tmp_path / "hf"), str(tmp_path / "big")
    minitron("export-hf", f"load={teacher}", f"save={hf}", "dtype=fp32")
    model = AutoModelForCausalLM.from_pretrained(hf)
    n = model.config.vocab_size
    model.resize_token_embeddings(n + 128, mean_resizing=False)
    with torch.no_grad():  # loud rows: any of them taking softmax mass would show
        g = torch.Generator().manual_seed(0)
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[n:] = 3.0 * torch.randn(w[n:].shape, generator=g)
    model.save_pretrained(hf)
    minitron("import-hf", f"load={hf}", f"save={big}", "dtype=fp32")
    assert read_meta(big).arch.vocab_size == n + 128 != read_meta(student).arch.vocab_size
    data = corpora["stdlib-code"]
    ref_row, ref_w = _one_step(student, teacher, data, str(tmp_path / "a"), tp, 1, tp)
    row, w = _one_step(student, big, data, str(tmp_path / "b"), tp, 1, tp)
    for key in ("train/loss", "train/lm_loss", "train/grad_norm"):
        assert abs(row[key] - ref_row[key]) <= 1e-6 * abs(ref_row[key]), (tp, key, row, ref_row)
    for k in ref_w:
        assert (w[k] - ref_w[k]).abs().max() <= 1e-6 * ref_w[k].abs().max(), (tp, k)


def test_distillation_from_stored_predictions_follows_online_top_k(
    student, teacher, corpora, tmp_path
):
    """``teacher-logits`` then ``distill teacher_logits=`` (no teacher in memory) follows the
    online top-k run (``distill.top_k``, the teacher's logits in memory) step by step within the
    stored bf16 precision, validation included; predictions for another run's keys are refused
    in one line."""
    import json

    data = corpora["stdlib-code"]
    keys = [
        f"data.train=[{data}]",
        f"data.cache_dir={tmp_path}/cache",
        "train.steps=4",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.seq_length=64",
        "train.eval_iters=1",
        "train.eval_interval=2",
        "distill.top_k=8",
    ]
    run = [
        f"load={student}",
        f"teacher={teacher}",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.precision=fp32",
        "train.log_interval=1",
        *keys,
    ]
    logits = str(tmp_path / "logits")
    minitron("teacher-logits", f"load={teacher}", f"save={logits}", *keys)
    minitron("distill", *run, f"save={tmp_path}/online")
    minitron("distill", *run, f"save={tmp_path}/offline", f"teacher_logits={logits}")
    on, off = (read_log(f"{tmp_path}/{n}.logs/train_log.jsonl") for n in ("online", "offline"))
    on_steps = [r["train/loss"] for r in on if "train/loss" in r]
    off_steps = [r["train/loss"] for r in off if "train/loss" in r]
    assert len(on_steps) == len(off_steps) == 4
    for a, b in zip(on_steps, off_steps):
        assert abs(a - b) <= 1e-2 * max(1.0, abs(a)), (on_steps, off_steps)
    on_val = [r["valid/loss"] for r in on if "valid/loss" in r]
    off_val = [r["valid/loss"] for r in off if "valid/loss" in r]
    assert on_val and len(on_val) == len(off_val)
    assert all(abs(a - b) <= 1e-2 * max(1.0, abs(a)) for a, b in zip(on_val, off_val))
    with open(f"{tmp_path}/offline/metrics.json") as f:
        assert json.load(f)["teacher_logits"] == logits
    bad = minitron(
        "distill",
        *run,
        "train.steps=5",
        f"save={tmp_path}/bad",
        f"teacher_logits={logits}",
        check=False,
    )
    assert bad.returncode == 2
    assert "computed for another teacher, data or sample order" in _one_error(bad)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_offline_distillation_sharded_equals_one_process(
    student, teacher, corpora, tmp_path, layout
):
    """From the same stored predictions, distillation at TP=2 / PP=2 follows one process's:
    every step's loss and gradient norm (rel <= 1e-5)."""
    data = corpora["stdlib-code"]
    keys = [
        f"data.train=[{data}]",
        f"data.cache_dir={tmp_path}/cache",
        "train.steps=3",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.seq_length=64",
        "train.eval_iters=0",
        "distill.top_k=8",
    ]
    logits = str(tmp_path / "logits")
    minitron("teacher-logits", f"load={teacher}", f"save={logits}", *keys)
    run = [
        f"load={student}",
        f"teacher={teacher}",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.precision=fp32",
        "train.log_interval=1",
        f"teacher_logits={logits}",
        *keys,
    ]
    minitron("distill", *run, f"save={tmp_path}/one")
    minitron("distill", *run, f"save={tmp_path}/two", layout, nproc=2)
    rows = [
        [
            (r["train/loss"], r["train/grad_norm"])
            for r in read_log(f"{tmp_path}/{n}.logs/train_log.jsonl")
            if "train/loss" in r
        ]
        for n in ("one", "two")
    ]
    assert len(rows[0]) == len(rows[1]) == 3
    for (a, ga), (b, gb) in zip(*rows):
        assert abs(a - b) <= 1e-5 * abs(a) and abs(ga - gb) <= 1e-5 * abs(ga), rows


@pytest.mark.slow
def test_offline_distillation_resumes_exactly_after_sigkill(student, teacher, corpora, tmp_path):
    """SIGKILL right after the first checkpoint of a distillation from stored predictions; the
    re-run resumes (reading the rows of the samples it had not consumed) and ends bitwise equal
    to an uninterrupted run."""
    from conftest import canonical_weights, run_and_kill_when

    data = corpora["stdlib-code"]
    keys = [
        f"data.train=[{data}]",
        f"data.cache_dir={tmp_path}/cache",
        "train.steps=4",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.seq_length=64",
        "train.eval_iters=0",
        "distill.top_k=8",
    ]
    logits = str(tmp_path / "logits")
    minitron("teacher-logits", f"load={teacher}", f"save={logits}", *keys)
    run = [
        "distill",
        f"load={student}",
        f"teacher={teacher}",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.precision=fp32",
        "train.save_interval=2",
        f"teacher_logits={logits}",
        *keys,
    ]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    minitron(*run, f"save={ref}")
    run_and_kill_when([*run, f"save={cut}"], os.path.join(cut, "minitron.json"))
    minitron(*run, f"save={cut}")
    a, b = canonical_weights(ref), canonical_weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fifty_offline_steps_end_with_the_online_top_k_run(student, teacher, corpora, tmp_path):
    """50 distillation steps from stored predictions (bf16 and int8) end within 0.01 nats of the
    online top-k run (validation KD loss), the issue's bar for losing nothing measurable."""
    data = corpora["stdlib-code"]
    keys = [
        f"data.train=[{data}]",
        f"data.cache_dir={tmp_path}/cache",
        "train.steps=50",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.seq_length=64",
        "train.eval_iters=2",
        "train.eval_interval=50",
        "distill.top_k=16",
    ]
    run = [
        "distill",
        f"load={student}",
        f"teacher={teacher}",
        "train.lr=1e-3",
        "train.warmup_steps=2",
        "train.precision=fp32",
        *keys,
    ]
    minitron(*run, f"save={tmp_path}/online")
    final = {}
    for precision in ("bf16", "int8"):
        logits = str(tmp_path / f"logits_{precision}")
        minitron(
            "teacher-logits",
            f"load={teacher}",
            f"save={logits}",
            *keys,
            f"distill.precision={precision}",
        )
        minitron(*run, f"save={tmp_path}/{precision}", f"teacher_logits={logits}")
    for name in ("online", "bf16", "int8"):
        rows = read_log(f"{tmp_path}/{name}.logs/train_log.jsonl")
        final[name] = [r["valid/loss"] for r in rows if "valid/loss" in r][-1]
    assert abs(final["bf16"] - final["online"]) <= 0.01, final
    assert abs(final["int8"] - final["online"]) <= 0.01, final
