"""The bad-input catalogue (issue 11), one test per case: see catalogue.py for the contract.

python3 -m pytest -q tests/reliability/ -p no:cacheprovider            # fast subset (CI)
python3 -m pytest -q tests/reliability/ -p no:cacheprovider -m slow    # the slow cases
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from catalogue import CASES, Shared, run_case  # noqa: E402


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """The small inputs every case starts from, built on first use and only once."""
    return Shared(str(tmp_path_factory.mktemp("catalogue-shared")))


def _param(case):
    marks = [pytest.mark.slow] if case.slow else []
    if case.nproc > 1:
        marks.append(pytest.mark.multiproc)
    if case.xfail:
        marks.append(pytest.mark.xfail(reason=case.xfail, strict=True))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case, shared, tmp_path):
    r = run_case(case, shared, str(tmp_path / "case"))
    assert r.returncode != 0, r.stderr[-3000:]
    assert len(r.errors) == 1, f"{len(r.errors)} error: lines ({case.nproc} ranks):\n{r.stderr}"
    assert case.expect in r.errors[0], r.errors[0]
    assert not r.traceback, r.stderr[-4000:]
    assert r.intact, r.problems
    assert r.ok, r.problems  # the case's own extra check (e.g. a last good checkpoint)


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    assert any(c.nproc > 1 and not c.slow for c in CASES), "CI needs a multi-rank case"
