"""The GPU check as far as a machine without a GPU can run it (seconds):

    python3 -m pytest -q tests/test_gpu_check.py

* the GPU set (``tests/gpu``) is collected by ``-m gpu``, and a ``-m gpu`` run skips every test
  with its reason - no failure, no error, no fixture started;
* ``benchmarks/gpu_check.sh --dry-run`` names the pytest and benchmark commands and runs
  nothing; without a GPU and without ``--dry-run`` it refuses in one line.

Every process gets ``CUDA_VISIBLE_DEVICES=""``, so on a GPU machine too this stays the no-GPU
case (and never starts the GPU set inside the CPU suite). The four processes run at once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

# PYTHON: the script's interpreter is this one (a virtualenv's), not whatever python3 is first.
NO_GPU = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", PYTHON=sys.executable)
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"]
GPU_CHECK = ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=NO_GPU, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def test_gpu_set_and_gpu_check_without_a_gpu():
    procs = {
        "collect": _start([*PYTEST, "--collect-only", "-q"]),
        "run": _start([*PYTEST, "-q", "-rs"]),
        "dry": _start([*GPU_CHECK, "--dry-run"]),
        "refuse": _start(GPU_CHECK),
    }
    done = {name: _finish(p) for name, p in procs.items()}

    code, out = done["collect"]
    collected = re.search(r"^(\d+) tests? collected", out, re.M)
    assert code == 0 and collected and int(collected.group(1)) > 0, out[-2000:]
    n = int(collected.group(1))

    code, out = done["run"]
    summary = out.strip().splitlines()[-1]
    assert code == 0 and re.fullmatch(rf"=* ?{n} skipped in [\d.]+s ?=*", summary), out[-2000:]
    assert out.count("torch.cuda.is_available() is False") >= 1, out[-2000:]

    code, out = done["dry"]
    assert code == 0 and "-m pytest -q -m gpu" in out, out
    assert "benchmarks/bench_train.py --device cuda" in out, out

    code, out = done["refuse"]
    lines = out.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "no CUDA GPU" in lines[0], out
