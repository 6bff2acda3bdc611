"""What a run needs late is checked before its first step (utils/preflight.py): lm-eval for a
pipeline that scores tasks (before: it failed after correction and pruning), room on disk for
a training checkpoint (before: it failed at the first save)."""

import os

import pytest
from conftest import WORKERS, launch

from minitron_mcore.errors import MinitronError
from minitron_mcore.utils import preflight

WORKER = os.path.join(WORKERS, "preflight_cli.py")


def _one_error(r) -> str:
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_free_disk_and_checkpoint_size(tmp_path):
    assert preflight.checkpoint_bytes(1000, training=True) == 16000
    assert preflight.checkpoint_bytes(1000, training=False, dtype_bytes=2) == 2000
    target = str(tmp_path / "not" / "yet" / "made")
    preflight.require_free_disk(target, 1, "a checkpoint", "save")  # its ancestor is asked
    with pytest.raises(MinitronError, match="GiB free; free some space") as e:
        preflight.require_free_disk(target, 2**60, "a checkpoint", "save")
    assert "\n" not in str(e.value)


@pytest.mark.multiproc
def test_pipeline_without_lm_eval_fails_before_anything_runs(tmp_path):
    run_dir = str(tmp_path / "run")
    r = launch(
        [WORKER, "no-lm-eval", "pipeline", f"run_dir={run_dir}", "pipeline.dry_run=true"],
        check=False,
    )
    assert "pip install -e '.[eval]'" in _one_error(r)
    ok = launch(
        [
            WORKER,
            "no-lm-eval",
            "pipeline",
            f"run_dir={run_dir}",
            "pipeline.dry_run=true",
            "evaluate.lm_eval_tasks=[]",
        ]
    )
    assert ok.returncode == 0 and not os.path.exists(run_dir)


@pytest.mark.multiproc
def test_training_without_room_for_a_checkpoint_fails_at_once(llama_ckpt, corpora, tmp_path):
    save = str(tmp_path / "out")
    r = launch(
        [
            WORKER,
            "disk-full",
            "correct",
            f"load={llama_ckpt}",
            f"save={save}",
            f"data.train=[{corpora['stdlib-code']}]",
            "train.steps=2",
            "train.warmup_steps=0",
            "train.seq_length=64",
            "train.global_batch_size=8",
            "train.lr=1e-3",
        ],
        check=False,
    )
    assert "a training checkpoint needs about" in _one_error(r)
    assert not os.path.exists(save) and not os.path.exists(save + ".logs")
