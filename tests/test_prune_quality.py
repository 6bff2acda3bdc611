"""On a trained model, activation-based width pruning beats random pruning to the same shape
(LM loss before retraining). The full table over all aggregations is
benchmarks/prune_quality.py; this runs its core with the papers' aggregation only."""

import os
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.multiproc


@pytest.mark.slow  # ~1 min; benchmarks/prune_quality.py measures the same at full size
def test_activation_pruning_beats_random(tokenizer_dir, tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    from prune_quality import run

    res = run(
        str(tmp_path), tokenizer_dir, steps=120, random_seeds=2, samples=32, aggs=["mean-l2"]
    )["all"]
    assert res["unpruned"] < res["mean-l2"], res  # pruning costs something ...
    assert res["mean-l2"] < res["random_best"] - 0.05, res  # ... activations cost clearly less
