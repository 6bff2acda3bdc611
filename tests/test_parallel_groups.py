"""Model-parallel groups are made once per layout and freed when the layout changes
(``minitron pipeline`` runs every command in one process group); data-parallel replicas share
the reading of a checkpoint."""

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


def test_replicas_share_the_reading_of_a_checkpoint(llama_ckpt, tmp_path):
    """Fully parallel load: two data-parallel replicas each read part of the weights (not all
    of them twice) and end with the same weights as one process that read them all."""
    rows = {}
    for nproc in (1, 2):
        out = str(tmp_path / f"load{nproc}.json")
        launch([os.path.join(WORKERS, "parallel_load.py"), llama_ckpt, out], nproc=nproc)
        with open(out) as f:
            rows[nproc] = json.load(f)
    (alone,), (r0, r1) = rows[1], rows[2]
    assert 0 < r0["reads"] < alone["reads"] and 0 < r1["reads"] < alone["reads"], rows
    assert r0["reads"] + r1["reads"] == alone["reads"], rows
    assert r0["sums"] == r1["sums"] == alone["sums"]
