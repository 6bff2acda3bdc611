"""The launchers' ``--dry-run`` (and ``DRY_RUN=1``): the exact srun / torchrun command and the
environment it gets, for single- and multi-node SLURM variable sets, with stub ``srun``,
``scontrol``, ``scancel``, ``torchrun``, ``python`` and ``nvidia-smi`` programs that record
every call - so the tests also see that a dry run starts nothing.  Then the NGC Dockerfile:
statically, and its install step run for real against a stub ``python`` (no Docker here)."""

import os
import re
import shlex
import shutil
import stat
import subprocess

import pytest
from conftest import ROOT

SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
TORCHRUN_SH = os.path.join(ROOT, "launch", "torchrun.sh")
DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")

# Hydra overrides a shell must not touch: brackets, commas, spaces, quotes, $, globs, empty.
OVERRIDES = [
    "data.train=[a,b]",
    "data.valid=[0.3,/data/my corpus/x,0.7,/data/y]",
    "train.name=my run",
    "note=it's",
    "path=$HOME/*",
    'tag="q"',
    "",
    "parallel.tp=8",
]

SINGLE_NODE = {
    "SLURM_JOB_ID": "77",
    "SLURM_JOB_NODELIST": "node001",
    "SLURM_NNODES": "1",
    "SLURM_NTASKS": "8",
}
MULTI_NODE = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu-a[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "16",
    "SLURM_CPUS_PER_TASK": "12",
}
# (SLURM variables, scontrol's answer, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS)
JOBS = {
    "single-node": (SINGLE_NODE, ["node001"], "node001", "10077", "1"),
    "multi-node": (MULTI_NODE, ["gpu-a07", "gpu-a08"], "gpu-a07", "13456", "12"),
}

RECORDER = '#!/bin/sh\nprintf "%s\\n" "$(basename "$0") $*" >> "$STUB_DIR/calls"\n'


def _write_exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _stubs(tmp_path, hosts=("node001",), gpus=0):
    """bin/ with recording stubs: srun/torchrun/scancel record their argv and exit 0; scontrol
    prints the job's hosts; python prints the GPU count; nvidia-smi lists the GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "torchrun", "scancel"):
        _write_exe(
            bin_dir / name,
            RECORDER + f'printf "%s\\n" "$@" > "$STUB_DIR/{name}.args"\n'
            f'env > "$STUB_DIR/{name}.env"\n',
        )
    _write_exe(bin_dir / "scontrol", RECORDER + "".join(f"echo {h}\n" for h in hosts))
    _write_exe(bin_dir / "python", RECORDER + f"echo {gpus}\n")
    smi = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(gpus))
    _write_exe(bin_dir / "nvidia-smi", RECORDER + (smi or "exit 9\n"))
    return bin_dir


def _env(tmp_path, bin_dir, **extra):
    """The caller's environment without anything the launchers read, plus ``extra``."""
    drop = re.compile(
        r"SLURM_|SRUN_|CONTAINER_|NCCL_|TORCH_NCCL_|GLOO_|MASTER_|NNODES$|NODE_RANK$|"
        r"NPROC_PER_NODE$|CUDA_DEVICE_MAX_CONNECTIONS$|OMP_NUM_THREADS$|DRY_RUN$"
    )
    env = {k: v for k, v in os.environ.items() if not drop.match(k)}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_DIR=str(tmp_path), **extra)
    return env


def _run(script, args, env, cwd, check=True):
    r = subprocess.run(
        ["bash", script, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def _parse(stdout):
    """Dry-run output -> (exported variables, command argv), read the way a shell reads it."""
    lines = [ln for ln in stdout.splitlines() if ln and not ln.startswith("#")]
    exports = {}
    for line in lines[:-1]:
        words = shlex.split(line)
        assert words[0] == "export" and len(words) == 2, line
        name, _, value = words[1].partition("=")
        exports[name] = value
    return exports, shlex.split(lines[-1])


def _calls(tmp_path):
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def _started(tmp_path):
    """Calls of anything that starts work (scontrol / python / nvidia-smi only look)."""
    return [c for c in _calls(tmp_path) if c.split()[0] in ("srun", "torchrun", "scancel")]


def _container_flags(argv):
    return [a for a in argv if a.startswith("--container") or a == "--no-container-mount-home"]


# --------------------------------------------------------------------------------- slurm.sbatch


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("how", ["flag", "env"])
def test_sbatch_dry_run(tmp_path, job, how):
    slurm, hosts, master, port, omp = JOBS[job]
    env = _env(tmp_path, _stubs(tmp_path, hosts), **slurm)
    args = ["distill", *OVERRIDES]
    if how == "flag":
        args = ["--dry-run", *args]
    else:
        env["DRY_RUN"] = "1"
    r = _run(SBATCH, args, env, tmp_path)
    exports, argv = _parse(r.stdout)
    assert _started(tmp_path) == [], "a dry run must not start anything"
    assert argv == [
        "srun",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        "python",
        "-m",
        "minitron_mcore",
        "distill",
        *OVERRIDES,
    ]
    assert exports == {
        "MASTER_ADDR": master,
        "MASTER_PORT": port,
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "OMP_NUM_THREADS": omp,
        "NCCL_DEBUG": "WARN",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }
    assert "nothing was started" in r.stdout


@pytest.mark.parametrize("job", JOBS)
def test_sbatch_dry_run_container(tmp_path, job):
    slurm, hosts, master, port, _ = JOBS[job]
    env = _env(
        tmp_path,
        _stubs(tmp_path, hosts),
        CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.11-py3",
        CONTAINER_MOUNTS="/lustre:/lustre,/data:/data:ro",
        NCCL_IB_HCA="mlx5_0,mlx5_1",
        NCCL_SOCKET_IFNAME="ib0",
        NCCL_DEBUG="INFO",
        **slurm,
    )
    r = _run(SBATCH, ["--dry-run", "pretrain", *OVERRIDES], env, tmp_path)
    exports, argv = _parse(r.stdout)
    assert _started(tmp_path) == []
    # The site's NCCL settings are passed on; a value the user exported wins over the default.
    assert exports["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    assert exports["NCCL_SOCKET_IFNAME"] == "ib0"
    assert exports["NCCL_DEBUG"] == "INFO"
    assert exports["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert (exports["MASTER_ADDR"], exports["MASTER_PORT"]) == (master, port)
    workdir = str(tmp_path)
    flags = _container_flags(argv)
    assert flags[:4] == [
        "--container-image=nvcr.io#nvidia/pytorch:25.11-py3",
        f"--container-mounts=/lustre:/lustre,/data:/data:ro,{workdir}:{workdir}",
        f"--container-workdir={workdir}",
        "--no-container-mount-home",
    ]
    # Every exported variable also beats the image's ENV and enroot's hooks inside the container.
    assert flags[4] == "--container-env=" + ",".join(exports)
    assert len(flags) == 5
    assert argv[argv.index("python") :] == [
        "python",
        "-m",
        "minitron_mcore",
        "pretrain",
        *OVERRIDES,
    ]


def test_sbatch_dry_run_container_options(tmp_path):
    env = _env(
        tmp_path,
        _stubs(tmp_path),
        CONTAINER_IMAGE="/shared/minitron.sqsh",
        CONTAINER_WORKDIR="/workspace/minitron",
        CONTAINER_MOUNT_HOME="1",
        SRUN_ARGS="--mpi=pmix  --cpu-bind=none",
        **SINGLE_NODE,
    )
    _, argv = _parse(_run(SBATCH, ["--dry-run", "evaluate", "load=x"], env, tmp_path).stdout)
    flags = _container_flags(argv)
    # A given workdir is not mounted for you; no mounts given -> no --container-mounts at all.
    assert flags[:2] == [
        "--container-image=/shared/minitron.sqsh",
        "--container-workdir=/workspace/minitron",
    ]
    assert "--no-container-mount-home" not in flags
    assert argv[-7:] == [
        "--mpi=pmix",
        "--cpu-bind=none",
        "python",
        "-m",
        "minitron_mcore",
        "evaluate",
        "load=x",
    ]


@pytest.mark.parametrize("job", JOBS)
def test_sbatch_no_container_flags_without_an_image(tmp_path, job):
    slurm, hosts, *_ = JOBS[job]
    env = _env(tmp_path, _stubs(tmp_path, hosts), CONTAINER_MOUNTS="/lustre:/lustre", **slurm)
    r = _run(SBATCH, ["--dry-run", "distill"], env, tmp_path)
    assert _container_flags(_parse(r.stdout)[1]) == []
    assert "CONTAINER_MOUNTS is set but CONTAINER_IMAGE is not" in r.stderr


def test_sbatch_dry_run_outside_a_job(tmp_path):
    """On a login node (no SLURM variables) the dry run still shows the command; no scontrol."""
    env = _env(tmp_path, _stubs(tmp_path))
    r = _run(SBATCH, ["--dry-run", "distill", "data.train=[a,b]"], env, tmp_path)
    exports, argv = _parse(r.stdout)
    assert "MASTER_ADDR" not in exports and argv[-2:] == ["distill", "data.train=[a,b]"]
    assert _calls(tmp_path) == []


@pytest.mark.parametrize("job", JOBS)
def test_sbatch_runs_what_the_dry_run_shows(tmp_path, job):
    """The real run prints the same lines into the job log and srun gets exactly that argv and
    environment; pasting the dry-run lines into a shell gives srun the same argv too."""
    slurm, hosts, *_ = JOBS[job]
    env = _env(
        tmp_path, _stubs(tmp_path, hosts), CONTAINER_IMAGE="img", NCCL_IB_HCA="mlx5", **slurm
    )
    dry = _run(SBATCH, ["--dry-run", "distill", *OVERRIDES], env, tmp_path)
    exports, argv = _parse(dry.stdout)
    real = _run(SBATCH, ["distill", *OVERRIDES], env, tmp_path)
    assert [c.split()[0] for c in _started(tmp_path)] == ["srun"]
    assert real.stdout.splitlines() == [
        ln for ln in dry.stdout.splitlines() if not ln.startswith("#")
    ]
    assert (tmp_path / "srun.args").read_text().split("\n")[:-1] == argv[1:]
    srun_env = dict(
        ln.split("=", 1) for ln in (tmp_path / "srun.env").read_text().splitlines() if "=" in ln
    )
    assert {k: srun_env[k] for k in exports} == exports

    (tmp_path / "srun.args").unlink()
    pasted = subprocess.run(
        ["bash", "-c", dry.stdout], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert pasted.returncode == 0, pasted.stderr
    assert (tmp_path / "srun.args").read_text().split("\n")[:-1] == argv[1:]


def test_sbatch_output_file_per_job():
    directives = [ln.split()[1] for ln in open(SBATCH) if ln.startswith("#SBATCH")]
    assert "--output=%x-%j.out" in directives


# --------------------------------------------------------------------------------- torchrun.sh


def _torchrun_argv(nproc, nnodes, rank, addr, port):
    return [
        "torchrun",
        "--nproc-per-node",
        nproc,
        "--nnodes",
        nnodes,
        "--node-rank",
        rank,
        "--master-addr",
        addr,
        "--master-port",
        port,
        "-m",
        "minitron_mcore",
    ]


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("gpus", [0, 8], ids=["cpu", "gpu"])
def test_torchrun_sh_dry_run_single_node(tmp_path, job, gpus):
    slurm, _, _, port, _ = JOBS[job]
    env = _env(tmp_path, _stubs(tmp_path, gpus=gpus), **slurm)
    r = _run(TORCHRUN_SH, ["--dry-run", "import-hf", *OVERRIDES], env, tmp_path)
    exports, argv = _parse(r.stdout)
    assert _started(tmp_path) == []
    nproc = str(gpus or 2)  # the GPU count, or 2 on CPU
    assert argv == _torchrun_argv(nproc, "1", "0", "127.0.0.1", port) + ["import-hf", *OVERRIDES]
    assert exports == ({"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if gpus else {})


@pytest.mark.parametrize("gpus", [0, 4], ids=["cpu", "gpu"])
def test_torchrun_sh_dry_run_multi_node(tmp_path, gpus):
    env = _env(
        tmp_path,
        _stubs(tmp_path, gpus=gpus),
        NNODES="2",
        NODE_RANK="1",
        MASTER_ADDR="gpu-a07",
        NPROC_PER_NODE="4",
        DRY_RUN="1",
        **MULTI_NODE,
    )
    r = _run(TORCHRUN_SH, ["distill", *OVERRIDES], env, tmp_path)
    exports, argv = _parse(r.stdout)
    assert _started(tmp_path) == []
    assert argv == _torchrun_argv("4", "2", "1", "gpu-a07", "13456") + ["distill", *OVERRIDES]
    assert exports == ({"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if gpus else {})
    # NPROC_PER_NODE given: nvidia-smi is asked, torch is not imported.
    assert not any(c.startswith("python") for c in _calls(tmp_path))


def test_torchrun_sh_keeps_given_values(tmp_path):
    env = _env(
        tmp_path,
        _stubs(tmp_path, gpus=8),
        NPROC_PER_NODE="3",
        MASTER_PORT="23456",
        CUDA_DEVICE_MAX_CONNECTIONS="8",
    )
    exports, argv = _parse(_run(TORCHRUN_SH, ["--dry-run", "x"], env, tmp_path).stdout)
    assert argv == _torchrun_argv("3", "1", "0", "127.0.0.1", "23456") + ["x"]
    assert exports == {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}


def test_torchrun_sh_multi_node_needs_master_addr(tmp_path):
    env = _env(tmp_path, _stubs(tmp_path), NNODES="2", NPROC_PER_NODE="2")
    r = _run(TORCHRUN_SH, ["distill"], env, tmp_path, check=False)
    assert r.returncode == 2 and "MASTER_ADDR" in r.stderr
    assert _started(tmp_path) == []


@pytest.mark.parametrize("gpus", [0, 2], ids=["cpu", "gpu"])
def test_torchrun_sh_runs_what_the_dry_run_shows(tmp_path, gpus):
    env = _env(tmp_path, _stubs(tmp_path, gpus=gpus), **MULTI_NODE)
    exports, argv = _parse(
        _run(TORCHRUN_SH, ["--dry-run", "distill", *OVERRIDES], env, tmp_path).stdout
    )
    _run(TORCHRUN_SH, ["distill", *OVERRIDES], env, tmp_path)
    assert (tmp_path / "torchrun.args").read_text().split("\n")[:-1] == argv[1:]
    torchrun_env = (tmp_path / "torchrun.env").read_text().splitlines()
    assert ("CUDA_DEVICE_MAX_CONNECTIONS=1" in torchrun_env) == bool(gpus)
    assert exports == ({"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if gpus else {})


# ------------------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions():
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", open(DOCKERFILE).read())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_static():
    instructions = _dockerfile_instructions()
    ops = [op for op, _ in instructions]
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1] for op, rest in instructions if op == "ARG"
    }
    base = next(rest for op, rest in instructions if op == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    # An NGC PyTorch image with a year.month tag; Python >= 3.10 there since 22.xx.
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", base), base
    assert int(base.split(":")[1][:2]) >= 25
    run = " ".join(rest for op, rest in instructions if op == "RUN")
    assert "setup.sh" in run
    assert re.search(r"PIP_CONSTRAINT=(''|\"\")? ", run)  # NGC's blanket pins: off for setup.sh
    # torch is never installed explicitly (pip / pip3 / python -m pip install ... torch)
    assert not re.search(r"pip3?\s+install\b[^;&|]*(\s|[\"'])torch\b", run), run
    assert "torch" in open(os.path.join(ROOT, "setup.sh")).read()  # setup.sh keeps it instead
    assert "WORKDIR" in ops and ("CMD" in ops or "ENTRYPOINT" in ops)
    env = " ".join(rest for op, rest in instructions if op == "ENV")
    for name in ("OMP_NUM_THREADS", "NCCL_", "CUDA_DEVICE_MAX_CONNECTIONS"):
        assert name not in env  # the launchers' business; under pyxis the image's ENV would win
    header = open(DOCKERFILE).read().split("\nARG", 1)[0]
    assert "docker build" in header and "docker run" in header


def test_no_torch_in_requirements():
    names = [
        re.split(r"[<>=!~;\[ ]", ln.strip(), maxsplit=1)[0].lower()
        for ln in open(os.path.join(ROOT, "requirements.txt"))
        if ln.strip() and not ln.startswith("#")
    ]
    assert "torch" not in names


# Stands for an NGC image's python: torch (an NGC pre-release build), Transformer Engine and apex
# installed; `pip install` records its argv, PIP_CONSTRAINT and the constraint files' contents.
NGC_PYTHON = r"""#!/bin/bash
echo "python $*" >> "$STUB_DIR/calls"
torch=$(cat "$STUB_DIR/torch.version")
if [ "$1 $2 $3" = "-m pip list" ]; then
  printf "apex==0.1\nnumpy==1.26.4\ntorch==%s\ntransformer_engine==2.9.0\n" "$torch"; exit 0
fi
if [ "$1 $2 $3" = "-m pip install" ]; then
  {
    echo "pip: ${*:4}"
    echo "PIP_CONSTRAINT=${PIP_CONSTRAINT-<unset>}"
    for f in ${PIP_CONSTRAINT-}; do echo "$f: $(cat "$f")"; done
  } >> "$STUB_DIR/pip.log"
  if [ -n "${STUB_PIP_CHANGES_TORCH:-}" ]; then echo 2.10.0 > "$STUB_DIR/torch.version"; fi
  exit 0
fi
case "$2" in
  "import torch") exit 0 ;;
  "import torch; print"*|*importlib.metadata*) echo "$torch"; exit 0 ;;
esac
echo "setup: ok - ngc stub"
"""
NGC_TORCH = "2.10.0a0+b558c986e8.nv25.11"


def _ngc_install(tmp_path, **extra):
    """Run the Dockerfile's RUN step with bash (its SHELL) in the repository, the stub python on
    PATH and NGC's PIP_CONSTRAINT set -> (result, pip.log lines)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):
        _write_exe(bin_dir / name, NGC_PYTHON)
    (tmp_path / "torch.version").write_text(NGC_TORCH + "\n")
    ngc_constraints = tmp_path / "etc-pip-constraint.txt"
    ngc_constraints.write_text("packaging==23.2\ntorch==" + NGC_TORCH + "\n")
    (run,) = [rest for op, rest in _dockerfile_instructions() if op == "RUN"]
    run = run.replace("/tmp/", f"{tmp_path}/")
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin",
        "STUB_DIR": str(tmp_path),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "PIP_CONSTRAINT": str(ngc_constraints),
        **extra,
    }
    r = subprocess.run(
        [shutil.which("bash"), "-euo", "pipefail", "-c", run],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = (tmp_path / "pip.log").read_text().splitlines()
    return r, log


def test_dockerfile_install_keeps_the_image_torch(tmp_path):
    r, log = _ngc_install(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    installs = [ln for ln in log if ln.startswith("pip: ")]
    assert installs == ["pip: -q -r requirements.txt", "pip: -q --no-deps -e ."]
    # Both installs ran with only the torch pin: NGC's blanket constraints are off, the image's
    # exact torch version is pinned, and the pin file is gone afterwards.
    constraints = [ln for ln in log if ln.startswith("PIP_CONSTRAINT=")]
    assert len(constraints) == 2 and len(set(constraints)) == 1
    pin_file = constraints[0].split("=", 1)[1]
    assert " " not in pin_file and "etc-pip-constraint" not in pin_file
    assert f"{pin_file}: torch=={NGC_TORCH}" in log
    assert not os.path.exists(pin_file)
    assert f"keeping installed torch {NGC_TORCH}" in r.stdout
    assert not list(tmp_path.glob("image-packages.txt"))


def test_dockerfile_install_fails_when_torch_changes(tmp_path):
    r, _ = _ngc_install(tmp_path, STUB_PIP_CHANGES_TORCH="1")
    assert r.returncode != 0
    assert f"< torch=={NGC_TORCH}" in r.stdout and "> torch==2.10.0" in r.stdout


def test_setup_sh_pins_torch_after_the_callers_constraints(tmp_path):
    """Outside Docker: a constraints file the caller set stays, the torch pin is added to it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "python3", NGC_PYTHON)
    (tmp_path / "torch.version").write_text("2.13.0+cu128\n")
    own = tmp_path / "mine.txt"
    own.write_text("numpy<2\n")
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin",
        "STUB_DIR": str(tmp_path),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "PIP_CONSTRAINT": str(own),
    }
    r = subprocess.run(
        [shutil.which("bash"), os.path.join(ROOT, "setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / "pip.log").read_text().splitlines()
    constraints = {ln for ln in log if ln.startswith("PIP_CONSTRAINT=")}
    assert len(constraints) == 1
    files = constraints.pop().split("=", 1)[1].split()
    assert files[0] == str(own) and len(files) == 2
    assert f"{files[1]}: torch==2.13.0+cu128" in log
    assert "pinning torch==2.13.0+cu128" in r.stdout
