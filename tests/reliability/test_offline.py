"""No network at run time (issue 11, safety): the pipeline runs in a new network namespace
(``unshare -n``) whose only interface is loopback, brought up inside it because the
single-host gloo process group talks to itself over 127.0.0.1 - no route leaves the machine,
so any attempt to reach a hub, a package index or a telemetry endpoint fails, and the run must
pass anyway.

python3 -m pytest -q -m slow tests/reliability/test_offline.py -p no:cacheprovider

Both cases are ``slow``: the tiny pipeline takes ~2 min, the default one ~8 min on 2 cores.
Skipped where the machine does not allow new network namespaces (unprivileged containers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import ROOT, _env  # noqa: E402
from test_pipeline import TINY  # noqa: E402

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

PROBE = (
    "import socket\n"
    "for host in ('1.1.1.1', 'pypi.org', 'huggingface.co'):\n"
    "    try:\n"
    "        socket.create_connection((host, 443), timeout=3).close()\n"
    "        print('reached', host)\n"
    "    except OSError:\n"
    "        pass\n"
)


def _offline(argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        pytest.skip("unshare(1) or ip(8) is not installed")
    if subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"]).returncode != 0:
        pytest.skip("this machine does not allow new network namespaces (unshare -n)")
    env = _env()
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(k, None)  # the code must not rely on these to stay offline
    return subprocess.run(
        [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$0" "$@"', sys.executable]
        + argv,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def _summary(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_namespace_has_no_network():
    r = _offline(["-c", PROBE], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "reached" not in r.stdout, r.stdout


def test_tiny_pipeline_with_lm_eval_runs_offline(tmp_path):
    run_dir = str(tmp_path / "run")
    tiny = [a for a in TINY if not a.startswith("evaluate.lm_eval_tasks")]
    r = _offline(["-m", "minitron_mcore", "pipeline", f"run_dir={run_dir}", *tiny], 1800)
    summary = _summary(r)
    assert not summary["failed"]
    # lm-evaluation-harness scored the local task inside the namespace
    report = open(os.path.join(run_dir, "report.md")).read()
    assert "minitron_stdlib_mc acc" in report
    for v in ("width", "depth"):
        assert os.path.exists(os.path.join(run_dir, "hf", v, "config.json"))


def test_default_pipeline_runs_offline(tmp_path):
    summary = _summary(
        _offline(["-m", "minitron_mcore", "pipeline", f"run_dir={tmp_path / 'demo'}"], 3600)
    )
    assert not summary["failed"] and summary["steps"] > 10
