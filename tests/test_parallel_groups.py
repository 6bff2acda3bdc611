"""Model-parallel groups are made once per layout and freed when the layout changes
(``minitron pipeline`` runs every command in one process group)."""

import json
import os

import pytest
from conftest import WORKERS, launch

pytestmark = pytest.mark.multiproc


def test_groups_once_per_layout_and_freed_on_change(tmp_path):
    out = str(tmp_path / "rows.json")
    launch([os.path.join(WORKERS, "layouts.py"), out], nproc=2)
    with open(out) as f:
        rows = json.load(f)
    # the outer context made the tp=1/pp=1 groups: the first inner one reuses them
    (tp1, tp2, tp2_again, pp2, tp1_again) = rows
    assert tp1[2:4] == [0, 0], rows
    assert tp2[2] > 0 and tp2[3] > 0, rows  # new groups, the old ones destroyed
    assert tp2_again[2:4] == [0, 0], rows
    assert pp2[2] > 0 and pp2[3] > 0 and tp1_again[2] > 0, rows
    # every context's groups work and have the layout's sizes
    assert [(r[4], r[5]) for r in rows] == [(1, 1), (2, 1), (2, 1), (1, 2), (1, 1)], rows
