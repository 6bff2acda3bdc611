"""setup.sh's choice of torch, run for real against stub ``python3`` and ``nvidia-smi`` commands:
CPU wheels first on a machine without an NVIDIA GPU, the default index when that index is out
of reach (or on a GPU machine), and never a reinstall of an importable torch."""

import os
import shutil
import subprocess

import pytest
from conftest import ROOT

CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Stands for python3: records every call; `import torch` succeeds when STUB_TORCH=1; the
# reachability probe (a script on stdin) exits STUB_PROBE_RC; `pip install --index-url`
# exits STUB_INDEX_PIP_RC; everything else succeeds.
PYTHON_STUB = r"""#!/bin/bash
echo "$*" >> "$STUB_LOG"
if [ "$1" = "-c" ] && [ "$2" = "import torch" ]; then exit $((1 - ${STUB_TORCH:-0})); fi
if [ "$1" = "-c" ] && [[ "$2" == "import torch; print"* ]]; then echo 2.13.0+stub; exit 0; fi
if [ "$1" = "-" ]; then cat > /dev/null; exit "${STUB_PROBE_RC:-0}"; fi
if [ "$1 $2 $3" = "-m pip install" ] && [[ " $* " == *" --index-url "* ]]; then
  exit "${STUB_INDEX_PIP_RC:-0}"
fi
if [ "$1" = "-c" ]; then echo "setup: ok - stub"; fi
exit 0
"""

GPU_STUB = '#!/bin/bash\necho "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-0)"\n'
NO_DRIVER_STUB = (
    "#!/bin/bash\necho \"NVIDIA-SMI has failed because it couldn't communicate with the "
    'NVIDIA driver."\nexit 9\n'
)


def _setup(tmp_path, nvidia_smi=None, **env_vars):
    """Run setup.sh with only the stubs (and the few tools it needs) on PATH -> (python3
    calls, stdout)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "grep", "cat"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    stubs = {"python3": PYTHON_STUB}
    if nvidia_smi:
        stubs["nvidia-smi"] = nvidia_smi
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": str(bin_dir), "STUB_LOG": str(log), "HOME": str(tmp_path), **env_vars}
    r = subprocess.run(
        [shutil.which("bash"), os.path.join(ROOT, "setup.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "setup: ok - stub", r.stdout
    calls = log.read_text().splitlines()
    # requirements and the package itself never come with --index-url (torch's choice only)
    assert "-m pip install -q -r requirements.txt" in calls
    assert "-m pip install -q --no-deps -e ." in calls
    return [c for c in calls if c.startswith("-m pip install") and "torch==" in c], calls


@pytest.mark.parametrize("nvidia_smi", [None, NO_DRIVER_STUB], ids=["absent", "no-driver"])
def test_no_gpu_installs_cpu_wheels(tmp_path, nvidia_smi):
    torch_installs, calls = _setup(tmp_path, nvidia_smi)
    assert torch_installs == [f"-m pip install -q --index-url {CPU_INDEX} torch==2.13.0"]
    assert any(c.startswith(f"- {CPU_INDEX}/torch/ ") for c in calls)  # probed first


def test_unreachable_cpu_index_falls_back_to_default_index(tmp_path):
    torch_installs, _ = _setup(tmp_path, STUB_PROBE_RC="1")
    assert torch_installs == ["-m pip install -q torch==2.13.0"]


def test_failed_install_from_cpu_index_falls_back_to_default_index(tmp_path):
    torch_installs, _ = _setup(tmp_path, STUB_INDEX_PIP_RC="1")
    assert torch_installs == [
        f"-m pip install -q --index-url {CPU_INDEX} torch==2.13.0",
        "-m pip install -q torch==2.13.0",
    ]


def test_gpu_machine_uses_default_index(tmp_path):
    torch_installs, calls = _setup(tmp_path, GPU_STUB)
    assert torch_installs == ["-m pip install -q torch==2.13.0"]
    assert not any(c.startswith("- ") for c in calls)  # no probe either


def test_importable_torch_is_never_reinstalled(tmp_path):
    torch_installs, _ = _setup(tmp_path, STUB_TORCH="1")
    assert torch_installs == []


def test_index_override(tmp_path):
    torch_installs, _ = _setup(tmp_path, TORCH_INDEX_URL="", TORCH_SPEC="torch==2.12.0")
    assert torch_installs == ["-m pip install -q torch==2.12.0"]
