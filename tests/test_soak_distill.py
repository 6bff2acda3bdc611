"""benchmarks/soak_distill.py: the RSS analysis on synthetic samples (fast), and the script on a
short real distillation (slow)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import ROOT, launch

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import soak_distill as soak  # noqa: E402

MiB = 2**20
STEPS = 1000


def samples(rss_of_step, steps=STEPS, per_step=2, spikes=()) -> list:
    """``per_step`` samples paired with each step 0..steps; ``spikes`` steps sample double RSS
    (a checkpoint writer alive) in one of their samples."""
    out = []
    for step in range(steps + 1):
        for i in range(per_step):
            rss = int(rss_of_step(step) * (1 + 0.002 * ((step * 7 + i) % 5 - 2)))  # +-0.4 %
            if step in spikes and i == 0:
                rss *= 2
            out.append(soak.Sample(step * 0.1 + i * 0.05, step, rss, rss, 1 + (step in spikes)))
    return out


def warming(step: int) -> float:
    """A run that loads and allocates for 60 steps, then stays at 500 MiB."""
    return (200 + 300 * min(step, 60) / 60) * MiB


def test_flat_after_warmup_passes_and_warmup_is_left_out():
    s = samples(warming, spikes=(250, 500, 750, 950, STEPS))
    r = soak.analyse(s, STEPS, warmup=100, window=100)
    assert r["passed"] and abs(r["growth"]) < 0.005, r
    assert r["rss_after_warmup"] == pytest.approx(500 * MiB, rel=0.005)
    assert r["rss_peak"] == max(x.rss for x in s) > 990 * MiB  # spikes count for the peak only
    assert r["samples_after_warmup"] == r["samples_end"] == 200
    assert r["max_procs"] == 2
    # The same series measured from step 0 grows by ~12 %: warm-up must not be in the window.
    r0 = soak.analyse(s, STEPS, warmup=0, window=100)
    assert not r0["passed"] and r0["growth"] > 0.1


def test_slow_growth_fails():
    # +3 % over the run (a per-step leak of ~15 KiB): the windows' medians differ by ~2.4 %.
    s = samples(lambda step: warming(step) * (1 + 0.03 * step / STEPS))
    r = soak.analyse(s, STEPS, warmup=100, window=100)
    assert not r["passed"]
    assert r["growth"] == pytest.approx(0.03 * (950 - 150) / STEPS, abs=0.002)
    # Half that leak stays under the goal.
    s = samples(lambda step: warming(step) * (1 + 0.015 * step / STEPS))
    assert soak.analyse(s, STEPS, warmup=100, window=100)["passed"]


def test_end_window_stops_before_the_final_save():
    # A last step that ends with a large final save: not part of the end median.
    s = samples(lambda step: warming(step) * (3 if step == STEPS else 1))
    r = soak.analyse(s, STEPS, warmup=100, window=100)
    assert r["passed"] and r["rss_end"] < 510 * MiB and r["rss_peak"] > 1400 * MiB


def test_window_without_samples_is_an_error():
    s = [x for x in samples(warming) if not 900 <= x.step < 1000]
    with pytest.raises(ValueError, match=r"steps \[900, 1000\)"):
        soak.analyse(s, STEPS, warmup=100, window=100)


def test_step_log_reads_complete_lines_only(tmp_path):
    path = tmp_path / "train_log.jsonl"
    log = soak.StepLog(str(path))
    assert log.last() == 0  # not written yet
    path.write_text('{"step": 0, "valid/loss": 5.0}\n{"step": 1, "train/loss": 4.0}\n{"step": 2')
    assert log.last() == 1  # the validation row and the half-written line do not count
    with open(path, "a") as f:
        f.write(', "train/loss": 3.9}\n')
    assert log.last() == 2


def test_write_readme_replaces_only_its_section(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"head\n{soak.BEGIN}\nold\n{soak.END}\ntail\n")
    soak.write_readme("new figures", str(path))
    assert path.read_text() == f"head\n{soak.BEGIN}\nnew figures\n{soak.END}\ntail\n"


@pytest.mark.slow
def test_soak_script_short_run(tmp_path):
    """The whole script on 200 steps: inputs built, the run sampled, every window filled."""
    script = os.path.join(ROOT, "benchmarks", "soak_distill.py")
    args = [script, "--steps", "200", "--interval", "0.2", "--workdir", str(tmp_path / "w")]
    r = launch(args, check=False, timeout=600)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["steps"] == 200 and result["samples_end"] > 0
    assert 100 * MiB < result["rss_after_warmup"] <= result["rss_peak"]
    assert result["passed"] == (r.returncode == 0)
    assert not os.path.exists(tmp_path / "w")  # removed without --keep
