"""Fault injection (issue 11), the CI subset: a couple of seeded kills per stage (see faults.py
for the contract); the other stages and more kills per stage are marked slow.

python3 -m pytest -q tests/reliability/test_faults.py -p no:cacheprovider            # CI subset
python3 -m pytest -q tests/reliability/test_faults.py -p no:cacheprovider -m slow    # the rest
OMP_NUM_THREADS=1 python3 tests/reliability/run_faults.py                            # full + table
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from faults import BY_NAME, STAGES, FaultShared, draw_kills, reference, run_kill  # noqa: E402
from run_faults import FAST  # noqa: E402

SEED = 0
SLOW_PER_STAGE = 10


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    return FaultShared(str(tmp_path_factory.mktemp("faults-shared")))


@pytest.fixture(scope="session")
def references(shared, tmp_path_factory):
    """stage -> its uninterrupted reference run (once per session)."""
    root = tmp_path_factory.mktemp("faults-ref")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = reference(BY_NAME[name], shared, str(root / name))
        return cache[name]

    return get


def _cases():
    out = []
    for stage in STAGES:
        n, n_term = FAST.get(stage.name, (0, 0))
        marks = [pytest.mark.multiproc] if stage.nproc > 1 else []
        out.append(pytest.param(stage.name, n, n_term, id=stage.name, marks=marks))
        slow = [*marks, pytest.mark.slow]
        out.append(pytest.param(stage.name, -1, -1, id=stage.name + "-full", marks=slow))
    return [p for p in out if p.values[1] != 0]


@pytest.mark.parametrize("stage,n,n_term", _cases())
def test_kill_and_rerun(stage, n, n_term, shared, references, tmp_path):
    """Every kill leaves nothing incomplete presented as complete, no process behind, and the
    identical re-run finishes with a result bitwise equal to the uninterrupted run."""
    s, ref = BY_NAME[stage], references(stage)
    if n < 0:  # the full set: the cases after the CI subset's, from the same seeded draw
        ci, ci_term = FAST.get(stage, (0, 0))
        kills = draw_kills(s, ref, SLOW_PER_STAGE, max(2, SLOW_PER_STAGE // 3), SEED)
        kills = [k for k in kills if k.kind != "sigterm"][ci:] + [
            k for k in kills if k.kind == "sigterm"
        ][ci_term:]
    else:
        kills = draw_kills(s, ref, n, n_term, SEED)
    failed = []
    for i, kill in enumerate(kills):
        o = run_kill(s, ref, kill, shared, str(tmp_path / f"case{i}"))
        if not o.ok:
            failed.append(f"{kill.kind} at {kill.moment}: {o.problems}")
    assert not failed, "\n".join(failed)
