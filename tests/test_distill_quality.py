"""Retraining a pruned student with knowledge distillation, on a tiny model through the CLI
(benchmarks/distill_quality.py --size tiny; the full study is that script's default size):
KD beats training the student's shape from scratch on both corpora, keeps the teacher's
original corpus clearly better than plain cross-entropy fine-tuning on the new data, and after
the longer budget reaches the corrected teacher on the distillation data."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, _env

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = tmp_path_factory.mktemp("distill_quality")
    script = os.path.join(ROOT, "benchmarks", "distill_quality.py")
    args = ["--size", "tiny", "--work-dir", str(work), "--epochs", "1", "4"]
    args += ["--students", "width", "--skip-variants"]
    r = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=3600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["mean"]


@pytest.mark.parametrize("epochs", ["1", "4"])
def test_kd_beats_scratch_on_both_corpora(study, epochs):
    kd, scratch = study["width"][f"kd-e{epochs}"], study["width"][f"scratch-e{epochs}"]
    for corpus in ("docs", "code"):
        assert kd[corpus] < scratch[corpus], (corpus, kd, scratch)


@pytest.mark.parametrize("epochs", ["1", "4"])
def test_kd_keeps_the_original_corpus_better_than_ce(study, epochs):
    kd, ce = study["width"][f"kd-e{epochs}"], study["width"][f"ce-e{epochs}"]
    assert kd["code"] < ce["code"] - 0.05, (kd, ce)


def test_kd_reaches_the_corrected_teacher_after_the_longer_budget(study):
    kd, teacher = study["width"]["kd-e4"], study["corrected"]
    assert kd["docs"] < teacher["docs"] + 0.05, (kd, teacher)
