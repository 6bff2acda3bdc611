"""The training engine end to end: learning, exact resume, preemption, teacher correction."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    ROOT,
    WORKERS,
    _env,
    canonical_weights,
    launch,
    minitron,
    read_log,
    run_and_kill_when,
)

from minitron_mcore.train.state import read_train_state

pytestmark = pytest.mark.multiproc


def test_pretrain_on_demo_corpus_lowers_validation_loss(tokenizer_dir, corpora, tmp_path):
    out = str(tmp_path / "base")
    r = minitron(
        "pretrain",
        "model=tiny-llama",
        f"tokenizer={tokenizer_dir}",
        f"save={out}",
        f"data.train=[{corpora['stdlib-code']}]",
        "train.steps=60",
        "train.seq_length=64",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.lr=3e-3",
        "train.warmup_steps=5",
        "train.eval_interval=30",
        "train.eval_iters=4",
    )
    m = json.loads(r.stdout.strip().splitlines()[-1])
    # A random 512-token model starts near ln(512) = 6.24 nats; 60 steps must take off > 1 nat.
    assert m["initial_valid_loss"] > 5.5
    assert m["valid_loss"] < m["initial_valid_loss"] - 1.0, m
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["valid_loss"] == m["valid_loss"]
    assert os.path.isdir(os.path.join(out + ".logs", "tensorboard"))


def _correct_args(ckpt, data, save, steps, extra=()):
    return [
        "-m",
        "minitron_mcore",
        "correct",
        f"load={ckpt}",
        f"save={save}",
        f"data.train=[{data}]",
        f"train.steps={steps}",
        "train.lr=1e-3",
        "train.warmup_steps=2",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.seq_length=128",
        "train.eval_iters=0",
        "train.precision=fp32",
        *extra,
    ]


def test_one_world_all_reduce_per_step(llama_ckpt, corpora, tmp_path):
    """The loss reports and the preemption flag share one all-reduce a step (one host sync),
    instead of one each: runs of 2 and 4 steps differ by exactly 2 WORLD all-reduces."""
    counts = {}
    for steps in (2, 4):
        out = str(tmp_path / f"count{steps}")
        args = _correct_args(llama_ckpt, corpora["stdlib-code"], str(tmp_path / f"s{steps}"), steps)
        args += ["train.warmup_steps=0"]
        launch([os.path.join(WORKERS, "count_world_collectives.py"), out, *args[2:]])
        with open(out) as f:
            counts[steps] = int(f.read())
    assert counts[4] - counts[2] == 2, counts


def test_resume_after_sigkill_is_bitwise_exact(llama_ckpt, corpora, tmp_path):
    data = corpora["stdlib-code"]
    straight = str(tmp_path / "straight")
    minitron(*_correct_args(llama_ckpt, data, straight, 10)[2:])

    resumed = str(tmp_path / "resumed")
    args = _correct_args(llama_ckpt, data, resumed, 10, ["train.save_interval=5"])
    # minitron.json (the tracker) appears once the first checkpoint is complete
    run_and_kill_when(args[2:], os.path.join(resumed, "minitron.json"))
    assert read_train_state(resumed)["iteration"] == 5, "the run was not stopped mid-way"
    minitron(*args[2:])  # same command again: resumes at step 5
    assert read_train_state(resumed)["iteration"] == 10

    a, b = canonical_weights(straight), canonical_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [
        r["train/loss"] for r in read_log(straight + ".logs/train_log.jsonl") if "train/loss" in r
    ]
    lb = {
        r["step"]: r["train/loss"]
        for r in read_log(resumed + ".logs/train_log.jsonl")
        if "train/loss" in r
    }
    assert [lb[s] for s in range(6, 11)] == la[5:]


def test_sigterm_saves_and_exits_cleanly(llama_ckpt, corpora, tmp_path):
    save = str(tmp_path / "preempted")
    args = _correct_args(llama_ckpt, corpora["stdlib-code"], save, 100000)
    proc = subprocess.Popen(
        [sys.executable] + args,
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = save + ".logs/train_log.jsonl"
    deadline = time.time() + 300
    while (not os.path.exists(log) or os.path.getsize(log) == 0) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["preempted"] is True and 0 < metrics["step"] < 100000
    assert read_train_state(save)["iteration"] == metrics["step"]


def test_sigterm_during_start_up_saves_and_exits_cleanly(llama_ckpt, corpora, tmp_path):
    """A SIGTERM while the command is still importing torch (a preemption at the very start;
    found by the fault driver under load: the process died with -15, nothing saved) is kept for
    the first step like any SIGTERM before the loop."""
    save = str(tmp_path / "preempted-early")
    args = _correct_args(llama_ckpt, corpora["stdlib-code"], save, 100000)
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime"] + args,
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # stderr's import log: signal once the CLI is in and torch is not yet imported
    seen = ""
    while "minitron_mcore.cli" not in seen:
        line = proc.stderr.readline()
        assert line, f"the command ended before the CLI was imported: {seen[-2000:]}"
        seen += line
    assert "| torch\n" not in seen and " torch._C" not in seen, "torch was already imported"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    err = "\n".join(x for x in err.splitlines() if not x.startswith("import time:"))
    assert proc.returncode == 0, err[-3000:]
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["preempted"] is True and metrics["step"] == 1
    assert read_train_state(save)["iteration"] == 1


def expected_lr(step, lr, min_lr, warmup, total):
    """Megatron's schedule as the recipe defines it: linear warmup from 0, then cosine decay.
    ``step`` is 1-based; the scheduler has taken step-1 increments before step ``step``."""
    n = step - 1
    if n <= warmup:
        return lr * n / warmup
    ratio = (n - warmup) / (total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1.0)


def test_correct_recipe_on_shifted_corpus(llama_ckpt, corpora, tmp_path):
    """Teacher correction on docstrings (the tiny model was never trained on them): the loss on
    that corpus falls, and the schedule follows the recipe (original lr / 5, 120 warmup steps,
    cosine to min_lr)."""
    save = str(tmp_path / "corrected")
    steps, original_lr = 150, 5e-3
    r = minitron(
        "correct",
        f"load={llama_ckpt}",
        f"save={save}",
        f"data.train=[{corpora['stdlib-docs']}]",
        f"original_lr={original_lr}",
        f"train.steps={steps}",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.seq_length=64",
        "train.eval_iters=4",
        "train.eval_interval=0",
    )
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["lr"] == pytest.approx(original_lr / 5)
    assert m["warmup_steps"] == 120
    assert m["valid_loss"] < m["initial_valid_loss"] - 0.3, m
    rows = [x for x in read_log(save + ".logs/train_log.jsonl") if "train/lr" in x]
    assert [x["step"] for x in rows] == list(range(1, steps + 1))
    for x in rows:
        want = expected_lr(x["step"], m["lr"], m["min_lr"], 120, steps)
        assert x["train/lr"] == pytest.approx(want, rel=1e-6, abs=1e-12), x
    assert m["min_lr"] == pytest.approx(m["lr"] / 10)


def test_training_errors(capsys, llama_ckpt, corpora, tmp_path):
    from minitron_mcore.cli import main

    def err_of(*argv):
        code = main(list(argv))
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert code == 2 and len(lines) == 1, err
        return lines[0]

    base = [
        "correct",
        f"load={llama_ckpt}",
        f"data.train=[{corpora['stdlib-code']}]",
        "train.lr=1e-3",
        "train.global_batch_size=8",
        "train.warmup_steps=1",
    ]
    assert "exceeds the model's maximum" in err_of(
        *base, f"save={tmp_path}/a", "train.seq_length=99999"
    )
    assert "not divisible by train.micro_batch_size" in err_of(
        *base, f"save={tmp_path}/b", "train.micro_batch_size=3", "train.seq_length=32"
    )
    assert "not found" in err_of(
        "correct",
        f"load={llama_ckpt}",
        f"save={tmp_path}/c",
        f"data.train=[{tmp_path}/missing]",
        "train.lr=1e-3",
        "train.global_batch_size=8",
        "train.seq_length=32",
    )
    assert "original_lr" in err_of(
        "correct", f"load={llama_ckpt}", f"save={tmp_path}/d", "train.global_batch_size=8"
    )
    assert not os.path.exists(f"{tmp_path}/a") and not os.path.exists(f"{tmp_path}/b")
