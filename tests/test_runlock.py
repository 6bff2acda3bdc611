"""One writer per output (utils/runlock.py): the lock file, its holder, stale locks, the parent
directories it makes; two runs started at once on one save=; the ranks deciding what to resume
on rank 0 alone; a worker stopping when its launcher dies."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, WORKERS, _env, canonical_weights, launch, minitron, read_log

from minitron_mcore.errors import MinitronError
from minitron_mcore.train.state import read_train_state
from minitron_mcore.utils import runlock


def test_lock_names_its_holder_and_refuses_a_second_writer(tmp_path):
    out = str(tmp_path / "a" / "b" / "out")
    first = runlock.OutputLock(out)
    first.acquire()
    with open(out + ".lock") as f:
        rec = json.load(f)
    assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
    with pytest.raises(MinitronError, match=f"pid {os.getpid()} on {socket.gethostname()}") as e:
        runlock.OutputLock(out).acquire()  # another open file: the flock is taken
    assert "\n" not in str(e.value) and "is being written by another run" in str(e.value)
    first.release()
    assert not os.path.exists(out + ".lock")
    assert not os.path.exists(tmp_path / "a")  # the directories it made, empty: removed


def _stale_record(path, **rec):
    with open(path, "w") as f:
        json.dump(dict({"host": socket.gethostname(), "started": "then"}, **rec), f)


def test_stale_locks_are_taken_over_live_ones_are_not(tmp_path, caplog):
    out = str(tmp_path / "out")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    _stale_record(out + ".lock", pid=int(dead))  # killed on this host: no flock, pid gone
    lock = runlock.OutputLock(out)
    lock.acquire()
    assert json.load(open(out + ".lock"))["pid"] == os.getpid()
    lock.release()
    # a holder on another host with a fresh heartbeat may be alive (no flock across hosts)
    _stale_record(out + ".lock", pid=1, host="elsewhere")
    with pytest.raises(MinitronError, match="on elsewhere"):
        runlock.OutputLock(out).acquire()
    # ... and is taken over once its heartbeat is older than STALE_SECONDS
    old = time.time() - runlock.STALE_SECONDS - 1
    os.utime(out + ".lock", (old, old))
    lock = runlock.OutputLock(out)
    lock.acquire()
    lock.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_SECONDS", 0.05)
    out = str(tmp_path / "out")
    lock = runlock.OutputLock(out)
    lock.acquire()
    old = time.time() - 1000
    os.utime(out + ".lock", (old, old))
    time.sleep(0.3)
    assert time.time() - os.stat(out + ".lock").st_mtime < 5
    lock.release()


def _correct(ckpt, data, save, steps, *extra):
    return [
        "correct",
        f"load={ckpt}",
        f"save={save}",
        f"data.train=[{data}]",
        f"train.steps={steps}",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.seq_length=64",
        "train.eval_iters=0",
        "train.precision=fp32",
        *extra,
    ]


@pytest.mark.multiproc
def test_two_runs_at_once_on_one_save(llama_ckpt, corpora, tmp_path):
    """Exactly one trains; the other stops at once with one error line naming the holder;
    the result equals a lone run's."""
    data = corpora["stdlib-code"]
    alone = str(tmp_path / "alone")
    minitron(*_correct(llama_ckpt, data, alone, 16))
    save = str(tmp_path / "shared")
    cmd = [sys.executable, "-m", "minitron_mcore", *_correct(llama_ckpt, data, save, 16)]
    procs = [
        subprocess.Popen(
            cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (err,) = [e for code, e in results if code == 2]
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "is being written by another run (pid" in lines[0], err
    a, b = canonical_weights(alone), canonical_weights(save)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(save + ".lock")


@pytest.mark.multiproc
def test_ranks_resume_what_rank_0_decided(llama_ckpt, corpora, tmp_path):
    """Rank 1 is shown another state of save= (no resumable version); the run still resumes
    on both ranks from rank 0's choice (before: rank 1 started fresh and the ranks fell out)."""
    data = corpora["stdlib-code"]
    save = str(tmp_path / "out")
    args = _correct(llama_ckpt, data, save, 4, "train.save_interval=2")
    launch(["-m", "minitron_mcore", *args[:4], "train.steps=2", *args[5:]], nproc=2)
    worker = os.path.join(WORKERS, "rank1_sees_another_directory.py")
    launch([worker, *args, "resume_override=[train.steps]"], nproc=2)
    assert read_train_state(save)["iteration"] == 4
    steps = [r["step"] for r in read_log(save + ".logs/train_log.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4], steps  # steps 3-4 continue the first run's 1-2


def _orphan(tmp_path, body: str, launcher_lives: float) -> int:
    """Start ``body`` as a worker of a launcher (in a session of its own, as torchrun does),
    SIGKILL the launcher after ``launcher_lives`` seconds; returns the worker's pid."""
    launcher = (
        "import os, subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {body!r}], start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = dict(_env(), PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True, env=env
    )
    worker = int(proc.stdout.readline())
    time.sleep(launcher_lives)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return worker


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(cond, seconds: float = 20.0) -> bool:
    deadline = time.time() + seconds
    while not cond() and time.time() < deadline:
        time.sleep(0.05)
    return cond()


def test_worker_stops_when_its_launcher_dies(tmp_path):
    """A worker watching its launcher: once its process group is up, the launcher's death is
    a SIGTERM (a checkpoint at the next step); before that (the worker was starting or waits
    at a rendezvous the dead launcher hosted) it exits at once; and a launcher already gone
    when the watch starts is seen too."""
    flag = tmp_path / "sigterm"
    up = (
        "import signal, sys, time\n"
        "import torch.distributed as dist\n"
        "from minitron_mcore.utils.runlock import watch_launcher\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(flag)!r}, 'w').close(), "
        "sys.exit(0)))\n"
        "watch_launcher(interval=0.05)\n"
        "time.sleep(60)\n"
    )
    worker = _orphan(tmp_path, up, launcher_lives=4)
    assert _wait_for(flag.exists), "the orphaned worker kept running"
    _wait_for(lambda: not _alive(worker))
    starting = (
        "import time\n"
        "from minitron_mcore.utils.runlock import watch_launcher\n"
        "watch_launcher(interval=0.05)\n"
        "time.sleep(60)  # as if blocked at the rendezvous\n"
    )
    worker = _orphan(tmp_path, starting, launcher_lives=3)
    assert _wait_for(lambda: not _alive(worker)), "a worker left starting kept waiting"
    late = "import time\ntime.sleep(2)\n" + starting  # the watch starts after the death
    worker = _orphan(tmp_path, late, launcher_lives=0.2)
    assert _wait_for(lambda: not _alive(worker)), "a worker orphaned before its watch kept on"


@pytest.mark.slow  # three training runs, ~25 s
def test_resume_with_another_global_batch_sees_every_sample_once(llama_ckpt, corpora, tmp_path):
    """2 steps of 8 samples, then resumed with resume_override=[train.global_batch_size] for 2
    steps of 16: the 48 samples are the first 48 of a run that never changed its batch, each
    once (the position is the stored sample count; before, step x new batch skipped 16). A
    changed sequence length cannot continue a run: one error line."""
    data, worker = corpora["stdlib-code"], os.path.join(WORKERS, "record_samples.py")

    def run(save, steps, gbs, *extra, seq=64, check=True):
        out = str(tmp_path / f"seen-{len(os.listdir(tmp_path))}.json")
        swap = {
            "train.global_batch_size=8": f"train.global_batch_size={gbs}",
            "train.seq_length=64": f"train.seq_length={seq}",
        }
        args = [swap.get(a, a) for a in _correct(llama_ckpt, data, save, steps, *extra)]
        r = launch([worker, out, *args], check=check)
        with open(out) as f:
            return json.load(f), r

    straight, _ = run(str(tmp_path / "straight"), 6, 8)
    save = str(tmp_path / "resumed")
    first, _ = run(save, 2, 8)
    override = "resume_override=[train.steps,train.global_batch_size]"
    second, _ = run(save, 4, 16, override)
    assert len(first) == 16 and len(second) == 32
    assert first + second == straight and len(set(straight)) == 48
    _, r = run(
        save,
        5,
        16,
        "resume_override=[train.steps,train.seq_length]",
        "train.seq_length=32",
        check=False,
    )
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "data position" in errors[0], r.stderr
