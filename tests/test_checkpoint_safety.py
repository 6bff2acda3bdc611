"""Checkpoints under attack and under failure: planted pickles run nothing, and a kill at any
point of a save leaves a loadable checkpoint from which the run resumes bitwise."""

import io
import json
import os
import pickle

import pytest
import torch
from conftest import WORKERS, launch, minitron

from minitron_mcore.checkpoint.megatron import resolve_checkpoint


class _Payload:
    """Unpickling this runs a shell command (what a planted checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path, marker):
    with open(path, "wb") as f:
        pickle.dump(_Payload(marker), f)


def _one_error(r):
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(llama_ckpt, corpora, tmp_path_factory):
    """A resumable training checkpoint (weights + optimizer) to plant files into."""
    save = str(tmp_path_factory.mktemp("trained") / "run")
    minitron(*_correct(llama_ckpt, corpora["stdlib-code"], save, steps=2))
    return save


def _correct(ckpt, data, save, steps, *extra):
    return [
        "correct",
        f"load={ckpt}",
        f"save={save}",
        f"data.train=[{data}]",
        f"train.steps={steps}",
        "train.lr=1e-3",
        "train.warmup_steps=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.seq_length=32",
        "train.eval_iters=0",
        "train.precision=fp32",
        *extra,
    ]


@pytest.mark.multiproc
@pytest.mark.parametrize("where", ["weights", "optim"])
def test_planted_metadata_runs_nothing(trained, llama_ckpt, corpora, tmp_path, where):
    """export-hf (our reader), evaluate (Megatron's load) and resume (optimizer state) all
    refuse a planted .metadata with one error line, and the payload never runs."""
    import shutil

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(trained, ckpt)
    marker = tmp_path / "pwned"
    _plant(os.path.join(resolve_checkpoint(ckpt), where, ".metadata"), marker)
    runs = [
        _correct(llama_ckpt, corpora["stdlib-code"], ckpt, 4, "resume_override=[train.steps]"),
    ]
    if where == "weights":
        runs += [
            ["export-hf", f"load={ckpt}", f"save={tmp_path}/hf"],
            ["evaluate", f"load={ckpt}", f"data.valid=[{corpora['stdlib-code']}]", "iters=1"],
        ]
    for args in runs:
        err = _one_error(minitron(*args, check=False))
        assert "refusing to load" in err and "nothing from it was run" in err, err
        assert not marker.exists(), f"{args[0]} ran the planted payload"
    assert not os.path.exists(f"{tmp_path}/hf")


def test_planted_bytes_item_is_refused(tmp_path):
    """Byte items (Megatron ShardedObjects such as _extra_state) are checked before torch DCP
    unpickles them with weights_only=False."""
    from minitron_mcore.checkpoint.safe_load import UnsafeCheckpointError, check_bytes_item

    marker = tmp_path / "pwned"
    evil = io.BytesIO(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match="nothing from it was run"):
        check_bytes_item(evil, "ckpt/weights")
    assert not marker.exists()
    plain = io.BytesIO()
    torch.save({"extra": None, "t": torch.ones(2)}, plain)
    plain.seek(0)
    check_bytes_item(plain, "ckpt/weights")  # plain data passes, and the stream is rewound
    assert plain.tell() == 0


def test_metadata_unpickler_admits_what_torch_writes(trained):
    """Real checkpoints (weights and optimizer state) read through the restricted unpickler."""
    from minitron_mcore.checkpoint.safe_load import SafeFileSystemReader

    for sub in ("weights", "optim"):
        md = SafeFileSystemReader(os.path.join(resolve_checkpoint(trained), sub)).read_metadata()
        assert md.state_dict_metadata


# The fault points of a 3-step run saving every step (keep 1): the first save builds a new
# checkpoint directory (points 1-8), the second adds a version and deletes the old (9-16).
SAVE_POINTS = list(range(1, 17))
# One point of every kind of state a kill can leave: partial files of a first save, its staged
# directory, a complete version without tracker, the tracker replaced, the old version half-gone.
SOME_POINTS = [2, 5, 7, 8, 13, 15, 16]


@pytest.mark.multiproc
@pytest.mark.slow  # ~35 s; CI keeps the kills in the final save and the fault driver's subset
def test_kill_at_each_kind_of_point_of_a_save(llama_ckpt, corpora, tmp_path):
    _kill_at(SOME_POINTS, llama_ckpt, corpora, tmp_path)


@pytest.mark.multiproc
@pytest.mark.slow
def test_kill_at_every_point_of_a_save(llama_ckpt, corpora, tmp_path):
    _kill_at(SAVE_POINTS, llama_ckpt, corpora, tmp_path)


# A kill inside a run's final save: the re-run finds the run finished (its final version is
# complete) and must present that version, not the one before, nor nothing. A 2-step run saving
# every 2 steps has one save, which builds the directory (5 tracker written, 6 replaced, 7 staged:
# the new directory is complete beside the target); saving every step, its final save adds a
# version (13 version in place, 14 tracker written, 15 tracker replaced).
FINAL_SAVE = {2: [5, 6, 7], 1: [13, 14, 15]}  # save_interval -> points
FINAL_SAVE_CI = {2: [5], 1: [14]}  # one point of each in CI, every point under -m slow


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "interval,points",
    [pytest.param(i, FINAL_SAVE_CI[i], id=f"interval{i}") for i in FINAL_SAVE_CI]
    + [
        pytest.param(i, FINAL_SAVE[i], marks=pytest.mark.slow, id=f"interval{i}-every-point")
        for i in FINAL_SAVE
    ],
)
def test_kill_in_the_final_save_then_rerun(interval, points, llama_ckpt, corpora, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    args = _correct(
        llama_ckpt,
        corpora["stdlib-code"],
        str(work / "run"),
        2,
        f"train.save_interval={interval}",
        "train.keep_checkpoints=1",
        f"data.cache_dir={tmp_path}/cache",
    )
    out = tmp_path / "result.json"
    where = ",".join(map(str, points))
    launch([os.path.join(WORKERS, "save_kill.py"), str(out), str(work), where, *args], timeout=900)
    for r in json.loads(out.read_text()):
        assert r["killed"] and r["resumed"] == 0, r
        assert r["final_iteration"] == 2 and r["same"], r


def _kill_at(kill_points, llama_ckpt, corpora, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    save = str(work / "run")
    args = _correct(
        llama_ckpt,
        corpora["stdlib-code"],
        save,
        3,
        "train.save_interval=1",
        "train.keep_checkpoints=1",
        f"data.cache_dir={tmp_path}/cache",
    )
    # The points really are the save's file operations, in this order.
    log = tmp_path / "faults.log"
    env_log = dict(MINITRON_FAULT_LOG=str(log))
    r = launch(["-m", "minitron_mcore", *args], env=env_log)
    assert r.returncode == 0
    names = [line.split()[2] for line in log.read_text().splitlines()]
    assert names[:8] == [
        "save:tmp-created",
        "save:weights-written",
        "save:extra-written",
        "save:sidecar-written",
        "tracker:written",
        "tracker:replaced",
        "save:staged",
        "save:home-in-place",
    ]
    assert names[8:16] == [
        "save:tmp-created",
        "save:weights-written",
        "save:extra-written",
        "save:sidecar-written",
        "save:version-in-place",
        "tracker:written",
        "tracker:replaced",
        "gc:removed",
    ]
    out = tmp_path / "result.json"
    points = ",".join(map(str, kill_points))
    launch([os.path.join(WORKERS, "save_kill.py"), str(out), str(work), points, *args], timeout=900)
    results = json.loads(out.read_text())
    assert [r["point"] for r in results] == kill_points
    for r in results:
        assert r["killed"], r
        # Killed in the first save: no checkpoint yet, or step 1 complete. In the second: the
        # previous (step 1) or the new (step 2) checkpoint, never a broken one.
        allowed = {None, 1} if r["point"] <= 8 else {1, 2}
        assert r["iteration"] in allowed and r["readable"], r
        assert r["resumed"] == 0 and r["final_iteration"] == 3 and r["same"], r


def test_loaded_state_may_lack_only_te_extra_state():
    """A Transformer Engine module lists ``_extra_state`` in ``state_dict()`` that Megatron
    leaves out of the sharded checkpoint when it is empty: that key alone may be missing."""
    from minitron_mcore.checkpoint.megatron import load_loaded_state
    from minitron_mcore.errors import MinitronError

    class WithExtraState(torch.nn.Linear):  # what a TE module looks like to load_state_dict
        def get_extra_state(self):
            return torch.zeros(0)

        def set_extra_state(self, state):
            pass

    model = torch.nn.Sequential(WithExtraState(2, 2))
    good = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    load_loaded_state(model, {k: torch.ones_like(v) for k, v in good.items()}, "ckpt")
    assert all(bool((v == 1).all()) for v in model.state_dict().values() if v.numel())
    for bad in ({"0.weight": good["0.weight"]}, dict(good, extra=torch.zeros(1))):
        with pytest.raises(MinitronError, match="do not fit the model") as e:
            load_loaded_state(model, bad, "ckpt")
        assert "\n" not in str(e.value)
