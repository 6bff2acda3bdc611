"""The README's example scripts run as a new user runs them, and do what they say."""

import json
import os
import subprocess

import pytest
from conftest import ROOT, _env

pytestmark = pytest.mark.multiproc


def _run(script: str, out_dir: str) -> list[str]:
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", script), out_dir],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout.splitlines()


def test_quickstart(tmp_path):
    out = _run("quickstart.sh", str(tmp_path / "qs"))
    assert out[-1].startswith("quickstart: ok")


# ~3 min; `minitron pipeline` (tests/test_pipeline.py) covers the same chain end to end in CI
@pytest.mark.slow
def test_compress_demo(tmp_path):
    """The whole pipeline on the demo corpus: the student is smaller, costs some loss before
    retraining, distillation wins most of it back, and its export runs in stock transformers."""
    out = _run("compress_demo.sh", str(tmp_path / "demo"))
    metrics = [json.loads(line) for line in out if line.startswith("{")]
    by_cmd = {}
    for m in metrics:
        by_cmd.setdefault(m["command"], []).append(m)
    teacher, student, distilled = by_cmd["evaluate"]
    prune = by_cmd["prune"][0]
    assert prune["params_after"] < 0.6 * prune["params_before"]
    assert prune["arch"]["num_layers"] == 3 and prune["arch"]["hidden_size"] == 96
    assert 0 < teacher["valid_loss"] < student["valid_loss"] < teacher["valid_loss"] + 2.0
    # distillation recovers a large part of what pruning cost
    assert distilled["valid_loss"] < student["valid_loss"] - 0.5 * (
        student["valid_loss"] - teacher["valid_loss"]
    ), (teacher, student, distilled)
    assert any(line.startswith("student, distilled") for line in out)
    assert any("LlamaForCausalLM" in line for line in out)
    assert out[-1].startswith("compress demo: ok")
