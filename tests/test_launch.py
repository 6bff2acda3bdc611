"""Launch plumbing: SLURM -> torchrun environment translation, the launcher scripts (with stub
``srun`` / ``scontrol`` / ``torchrun`` programs on PATH), and one error line per multi-rank run."""

import os
import signal
import stat
import subprocess
import time

import pytest
import torch
from conftest import ROOT, WORKERS, launch, minitron

from minitron_mcore.errors import MinitronError
from minitron_mcore.parallel import (
    ParallelConfig,
    expand_hostlist,
    init_process_group,
    should_print_error,
    slurm_master_port,
    slurm_to_torch_env,
    world_size,
)

SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
TORCHRUN_SH = os.path.join(ROOT, "launch", "torchrun.sh")

# What `srun` gives task 5 of a 16-task step on 2 nodes (8 tasks per node), trimmed.
SRUN_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu-a[07-08]",
    "SLURM_NODELIST": "gpu-a[07-08]",
    "SLURM_NTASKS": "16",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_STEP_NODELIST": "gpu-a[07-08]",
    "SLURM_STEP_NUM_TASKS": "16",
    "SLURM_PROCID": "13",
    "SLURM_LOCALID": "5",
    "SLURM_NODEID": "1",
}


def _no_scontrol(nodelist):
    raise AssertionError("hostnames_fn must not be called")


# ------------------------------------------------------------------------------ node lists


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node001", ["node001"]),
        ("node[001-004]", ["node001", "node002", "node003", "node004"]),
        ("node[1,3,5-7]", ["node1", "node3", "node5", "node6", "node7"]),
        ("gpu-a[01-02],gpu-b07", ["gpu-a01", "gpu-a02", "gpu-b07"]),
        ("rack1-node[08-10]-ib", ["rack1-node08-ib", "rack1-node09-ib", "rack1-node10-ib"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("a[1-2,5],b[098-100]", ["a1", "a2", "a5", "b098", "b099", "b100"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("10.0.0.5", ["10.0.0.5"]),
        ("nodeA,nodeB", ["nodeA", "nodeB"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node]1[", "node[a-b]", "node[3-1]", "node[]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(MinitronError, match="MASTER_ADDR"):
        expand_hostlist(bad)


# ------------------------------------------------------------------ SLURM -> torchrun env


def test_slurm_translation_multi_node():
    env = slurm_to_torch_env(SRUN_TASK, hostnames_fn=expand_hostlist)
    assert env == {
        "RANK": "13",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "MASTER_ADDR": "gpu-a07",
        "MASTER_PORT": str(slurm_master_port("4242")),
    }


@pytest.mark.parametrize(
    "nodelist, head",
    [
        ("node[001-004]", "node001"),
        ("node[1,3,5-7]", "node1"),
        ("gpu-a[01-02],gpu-b07", "gpu-a01"),
        ("rack1-node[08-10]-ib", "rack1-node08-ib"),
        ("node001", "node001"),
    ],
)
def test_slurm_translation_master_addr_is_first_host(nodelist, head):
    environ = dict(SRUN_TASK, SLURM_JOB_NODELIST=nodelist, SLURM_NODELIST=nodelist)
    del environ["SLURM_STEP_NODELIST"]
    assert slurm_to_torch_env(environ, hostnames_fn=expand_hostlist)["MASTER_ADDR"] == head


def test_slurm_translation_prefers_the_step_nodes():
    # srun -N1 inside a 2-node allocation: the step runs on the second node only.
    environ = dict(SRUN_TASK, SLURM_STEP_NODELIST="gpu-a08", SLURM_STEP_NUM_TASKS="8")
    env = slurm_to_torch_env(environ, hostnames_fn=expand_hostlist)
    assert (env["MASTER_ADDR"], env["WORLD_SIZE"]) == ("gpu-a08", "8")


def test_slurm_translation_single_node_single_task():
    environ = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_NTASKS": "1",
        "SLURM_STEP_ID": "3",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    env = slurm_to_torch_env(environ, hostnames_fn=expand_hostlist)
    assert env == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "node001",
        "MASTER_PORT": "10007",
    }


def test_slurm_translation_keeps_exported_master():
    environ = dict(SRUN_TASK, MASTER_ADDR="10.1.2.3", MASTER_PORT="31234")
    env = slurm_to_torch_env(environ, hostnames_fn=_no_scontrol)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.1.2.3", "31234")


def test_slurm_translation_leaves_torchrun_alone():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h"}
    assert slurm_to_torch_env(dict(SRUN_TASK, **torchrun), hostnames_fn=_no_scontrol) == {}


@pytest.mark.parametrize(
    "environ",
    [
        {},  # no SLURM at all
        # `salloc -n 16` then a plain `minitron ...`: an allocation, no task of a step.
        {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "n[1-2]"},
        # a plain `minitron ...` in the batch script: process 0 of the batch step, not srun's
        # (slurmstepd exports the batch step id 0xFFFFFFFB as a signed number).
        {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_STEP_ID": "-5"},
        # the same without any step id (older releases).
        {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},
        # salloc with an interactive step (LaunchParameters=use_interactive_step).
        {"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_STEP_ID": "-6"},
        {"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_STEPID": "4294967290"},
        # a job step without SLURM_PROCID.
        {k: v for k, v in SRUN_TASK.items() if k != "SLURM_PROCID"},
    ],
    ids=[
        "none",
        "salloc",
        "batch-script",
        "batch-no-step-id",
        "interactive-step",
        "interactive-unsigned",
        "no-procid",
    ],
)
def test_slurm_translation_only_in_srun_tasks(environ, monkeypatch):
    assert slurm_to_torch_env(environ, hostnames_fn=_no_scontrol) == {}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_STEPID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    assert world_size() == 1


def test_world_size_counts_srun_tasks(monkeypatch):
    """export-hf checks world_size() == 1: under srun -n 16 it must see 16, not 1."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in SRUN_TASK.items():
        monkeypatch.setenv(k, v)
    assert world_size() == 16
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's variables win
    assert world_size() == 4


def test_master_port_from_job_id():
    assert slurm_master_port("123456") == 10000 + 123456 % 20000
    assert slurm_master_port("123456") != slurm_master_port("123457")
    assert all(10000 <= slurm_master_port(str(j)) < 30000 for j in (0, 1, 19999, 20000, 10**9))


def _write_exe(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_scontrol_is_used_when_present(tmp_path, monkeypatch):
    """The default host expansion asks `scontrol show hostnames` (stub on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(
        bin_dir / "scontrol",
        '#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\nprintf "from-scontrol-1\\nx-2\\n"\n',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    environ = dict(SRUN_TASK)
    del environ["SLURM_STEP_NODELIST"]
    assert slurm_to_torch_env(environ)["MASTER_ADDR"] == "from-scontrol-1"
    assert (bin_dir / "args").read_text().split() == ["show", "hostnames", "gpu-a[07-08]"]


def test_parser_is_used_without_scontrol(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol anywhere
    environ = dict(SRUN_TASK, SLURM_STEP_NODELIST="rack1-node[08-10]-ib")
    assert slurm_to_torch_env(environ)["MASTER_ADDR"] == "rack1-node08-ib"


def test_cuda_device_wraps_local_rank(monkeypatch):
    """With --gpus-per-task each task sees one GPU: LOCAL_RANK 3 must use device 0."""
    import torch.distributed as dist

    from minitron_mcore import compat

    used, inits = [], []
    monkeypatch.setattr(compat, "activate", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: inits.append(a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", used.append)
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(k, v)
    init_process_group(ParallelConfig(backend="gloo"))
    assert used == [0] and len(inits) == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    used.clear()
    init_process_group(ParallelConfig(backend="gloo"))
    assert used == [1]


# ---------------------------------------------------------------------- launcher scripts


def _stub_bin(tmp_path, scontrol_hosts=None):
    """A bin/ modelling SLURM: `srun` records its argv and environment and runs one `task`,
    which on SIGTERM writes task.term and exits 0 (what training does after its checkpoint).
    Like the real srun (srun/signals.c), the stub turns a SIGTERM sent to srun itself into
    SIGKILL of its task (writing srun.term).  `scancel --signal=TERM JOB` delivers SIGTERM to
    the task, as SLURM does for every job step."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(
        bin_dir / "srun",
        "#!/usr/bin/env bash\n"
        'echo $$ > "$STUB_DIR/srun.pid"\n'
        'env > "$STUB_DIR/srun.env"\n'
        'printf "%s\\n" "$@" > "$STUB_DIR/srun.args"\n'
        'if [ -n "${STUB_EXIT:-}" ]; then exit "$STUB_EXIT"; fi\n'
        '"$(dirname "$0")/task" &\n'
        "task=$!\n"
        'trap \'echo TERM > "$STUB_DIR/srun.term"; kill -KILL "$task"; exit 137\' TERM\n'
        'wait "$task"\n',
    )
    _write_exe(
        bin_dir / "task",
        "#!/usr/bin/env bash\n"
        'trap \'echo TERM > "$STUB_DIR/task.term"; kill "$sleeper"; exit 0\' TERM\n'
        "sleep 30 &\n"
        "sleeper=$!\n"
        'echo $$ > "$STUB_DIR/task.pid"\n'
        'wait "$sleeper"\n'
        "exit 9\n",
    )
    _write_exe(
        bin_dir / "scancel",
        '#!/bin/sh\necho "$@" > "$STUB_DIR/scancel.args"\n'
        'kill -TERM "$(cat "$STUB_DIR/task.pid")"\n',
    )
    if scontrol_hosts is not None:
        _write_exe(
            bin_dir / "scontrol",
            "#!/bin/sh\n" + "".join(f"echo {h}\n" for h in scontrol_hosts),
        )
    return bin_dir


def _script_env(tmp_path, bin_dir, **extra):
    # Nothing of the caller's that changes what the launchers run (a dry run, a container).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "CONTAINER_", "SRUN_"))
        and k not in ("MASTER_ADDR", "MASTER_PORT", "DRY_RUN")
    }
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_DIR=str(tmp_path), **extra)
    return env


def _read_env(path):
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _wait_for(path, proc, timeout=20.0):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the batch script exited early: {proc.communicate()}"
        assert time.time() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def _kill_stubs(tmp_path):
    for name in ("task.pid", "srun.pid"):
        pid_file = tmp_path / name
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_sbatch_signals_the_job_steps():
    """`B:` would signal only the batch shell: the tasks must get the early SIGTERM."""
    lines = [ln.split() for ln in open(SBATCH) if ln.startswith("#SBATCH --signal")]
    assert lines == [["#SBATCH", "--signal=TERM@120"]], lines


def test_sbatch_passes_sigterm_to_the_tasks(tmp_path):
    """A SIGTERM to the batch shell alone (scancel --batch, or B: on the sbatch command line)
    reaches the tasks through scancel, not through srun (which would SIGKILL them), and the
    batch script waits for srun and exits with its code."""
    bin_dir = _stub_bin(tmp_path)
    env = _script_env(tmp_path, bin_dir, SLURM_JOB_ID="123456")
    # Output to a file, not a pipe: a stub left running must not hold the test up.
    with open(tmp_path / "batch.log", "w") as log:
        proc = subprocess.Popen(
            ["bash", SBATCH, "pretrain", "save=x"], env=env, cwd=ROOT, stdout=log, stderr=log
        )
    try:
        _wait_for(tmp_path / "task.pid", proc)
        time.sleep(0.3)  # let the stub srun install its trap
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_stubs(tmp_path)
    log = (tmp_path / "batch.log").read_text()
    assert (tmp_path / "task.term").exists(), f"the task never received SIGTERM: {log}"
    assert not (tmp_path / "srun.term").exists(), "srun got SIGTERM: it SIGKILLs its tasks"
    assert (tmp_path / "scancel.args").read_text().split() == ["--signal=TERM", "123456"]
    assert proc.returncode == 0, (proc.returncode, log)  # srun's (the tasks') exit code
    args = (tmp_path / "srun.args").read_text().split("\n")
    assert args[-4:-1] == ["minitron_mcore", "pretrain", "save=x"]


def test_sbatch_passes_srun_exit_code_and_master(tmp_path):
    bin_dir = _stub_bin(tmp_path, scontrol_hosts=["gpu-a07", "gpu-a08"])
    env = _script_env(
        tmp_path, bin_dir, SLURM_JOB_ID="123456", SLURM_JOB_NODELIST="gpu-a[07-08]", STUB_EXIT="3"
    )
    r = subprocess.run(["bash", SBATCH, "distill"], env=env, cwd=ROOT, timeout=30)
    assert r.returncode == 3
    srun_env = _read_env(tmp_path / "srun.env")
    assert srun_env["MASTER_PORT"] == str(slurm_master_port("123456")) == "13456"
    assert srun_env["MASTER_ADDR"] == "gpu-a07"


def test_sbatch_keeps_a_given_master_port(tmp_path):
    bin_dir = _stub_bin(tmp_path)
    env = _script_env(tmp_path, bin_dir, SLURM_JOB_ID="5", MASTER_PORT="23456", STUB_EXIT="0")
    assert subprocess.run(["bash", SBATCH, "x"], env=env, cwd=ROOT, timeout=30).returncode == 0
    assert _read_env(tmp_path / "srun.env")["MASTER_PORT"] == "23456"


@pytest.mark.parametrize("job_id, port", [("123456", "13456"), (None, "29500")])
def test_torchrun_sh_master_port(tmp_path, job_id, port):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "torchrun", '#!/bin/sh\nprintf "%s\\n" "$@" > "$STUB_DIR/args"\n')
    extra = {"NPROC_PER_NODE": "2"}
    if job_id:
        extra["SLURM_JOB_ID"] = job_id
    env = _script_env(tmp_path, bin_dir, **extra)
    assert subprocess.run(["bash", TORCHRUN_SH, "x"], env=env, timeout=30).returncode == 0
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("--master-port") + 1] == port


# ------------------------------------------------------------------------ one error line


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


@pytest.mark.parametrize(
    "environ, printed",
    [
        ({}, True),  # a plain single process
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"RANK": "1", "LOCAL_RANK": "1"}, False),  # same node as rank 0: rank 0 says it
        ({"RANK": "8", "LOCAL_RANK": "0"}, True),  # first rank of another node (own disks)
        ({"RANK": "9", "LOCAL_RANK": "1"}, False),
        (SRUN_TASK, False),  # SLURM task 13, local 5
        (dict(SRUN_TASK, SLURM_PROCID="8", SLURM_LOCALID="0"), True),
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, True),  # not a job step: one process
    ],
)
def test_should_print_error_outside_parallel_context(environ, printed):
    assert should_print_error(MinitronError("x"), environ) is printed


def test_should_print_error_after_rank0_comparison():
    same, differs = MinitronError("x"), MinitronError("y")
    same.minitron_rank0_same = True
    differs.minitron_rank0_same = False
    env = {"RANK": "1", "LOCAL_RANK": "1"}
    assert should_print_error(same, env) is False
    assert should_print_error(differs, env) is True
    assert should_print_error(same, {"RANK": "0", "LOCAL_RANK": "0"}) is True


@pytest.mark.multiproc
def test_input_error_printed_once_under_torchrun(tmp_path):
    load, save = f"load={tmp_path}/missing", f"save={tmp_path}/out"
    r = minitron("import-hf", load, save, nproc=2, check=False)
    assert r.returncode != 0
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and "does not exist" in lines[0], r.stderr[-3000:]


@pytest.mark.multiproc
@pytest.mark.parametrize("ranks", ["0,1", "1"])
def test_error_inside_parallel_context_printed_once(ranks):
    """Raised by every rank inside the parallel context: rank 0 prints it once.  Raised only by
    rank 1 (rank 0 is busy elsewhere): rank 1 prints it, so it is never lost."""
    worker = os.path.join(WORKERS, "cli_error.py")
    r = launch([worker, ranks], nproc=2, check=False, timeout=120)
    assert r.returncode != 0
    lines = _error_lines(r.stderr)
    assert lines == ["error: bad input for this test; fix it"], r.stderr[-3000:]


def test_single_process_error_still_printed(capsys, tmp_path):
    from minitron_mcore.cli import main

    code = main(["import-hf", f"load={tmp_path}/missing", f"save={tmp_path}/out"])
    assert code != 0
    assert _error_lines(capsys.readouterr().err)
