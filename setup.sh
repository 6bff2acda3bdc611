#!/usr/bin/env bash
# One-command set-up:  bash setup.sh
#
# Installs minitron_mcore (editable) and its dependencies into the active Python environment.
# * torch: kept as it is when already importable (an NGC container's CUDA build, or your own);
#   otherwise torch==2.13.0 (TORCH_SPEC overrides) is installed:
#   - on a machine without an NVIDIA GPU (no working `nvidia-smi`), from PyTorch's CPU wheel
#     index (TORCH_INDEX_URL, default https://download.pytorch.org/whl/cpu), because the
#     default index's Linux torch is a multi-GB CUDA build; when that index cannot be reached
#     (checked with a 10 s probe), or the install from it fails, from pip's default index;
#   - on a GPU machine, from pip's default index (CUDA build).
#   TORCH_INDEX_URL=URL picks another index, TORCH_INDEX_URL= (empty) the default one.
# * The torch chosen above is pinned for the rest of the install (see pin_torch), so no
#   dependency can swap it for another build.
# * Transformer Engine / apex are optional and never installed here (NGC images ship them).
#   In an NGC container run `PIP_CONSTRAINT='' bash setup.sh` (docker/Dockerfile does): the
#   image's own constraints file pins every preinstalled package, and megatron-core may need a
#   newer one (Megatron-Core's install guide unsets it the same way); the image's torch stays
#   pinned here.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CPU_INDEX=https://download.pytorch.org/whl/cpu
PROBE_SECONDS=${SETUP_PROBE_SECONDS:-10}

has_nvidia_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"
}

# Whether the index answers at all (DNS, firewall, proxy): a failed probe takes at most
# PROBE_SECONDS, where pip with its retries could hang for minutes.
index_reachable() {
  "$PY" - "${1%/}/torch/" "$PROBE_SECONDS" >/dev/null 2>&1 <<'EOF'
import sys
import urllib.request

urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).close()
EOF
}

install_torch() {
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
    return
  fi
  local index
  if [ -n "${TORCH_INDEX_URL+set}" ]; then
    index=$TORCH_INDEX_URL
  elif has_nvidia_gpu; then
    index=""
  else
    index=$CPU_INDEX
  fi
  if [ -n "$index" ]; then
    if index_reachable "$index"; then
      echo "setup: installing $TORCH_SPEC from $index"
      if "$PY" -m pip install -q --index-url "$index" "$TORCH_SPEC"; then
        return
      fi
      echo "setup: installing $TORCH_SPEC from $index failed; trying the default index"
    else
      echo "setup: $index cannot be reached; trying the default index"
    fi
  fi
  echo "setup: installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
}

# Every later pip call must keep the torch installed now: an NGC container's build (with the
# image's CUDA, Transformer Engine and apex compiled against it) or the one installed above. A
# constraints file pins its exact installed version, so a requirement it does not satisfy stops
# the install with pip's ResolutionImpossible instead of pip silently replacing it with a PyPI
# wheel. The version is the installed distribution's (importlib.metadata), which is what pip
# compares - torch.__version__ can differ from it (a PyPI CUDA wheel says 2.x+cu128 but is
# installed as 2.x). It is added to PIP_CONSTRAINT (files separated by spaces), so constraints
# the caller set still apply.
pin_torch() {
  local version
  version=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null) ||
    version=
  if ! [[ $version =~ ^[0-9][0-9A-Za-z.!+_-]*$ ]]; then
    echo "setup: cannot read the installed torch's version; it is not pinned"
    return
  fi
  TORCH_CONSTRAINT=$(mktemp "${TMPDIR:-/tmp}/minitron-torch-XXXXXX.txt")
  trap 'rm -f "$TORCH_CONSTRAINT"' EXIT
  echo "torch==$version" >"$TORCH_CONSTRAINT"
  export PIP_CONSTRAINT="${PIP_CONSTRAINT:+$PIP_CONSTRAINT }$TORCH_CONSTRAINT"
  echo "setup: pinning torch==$version for the remaining installs"
}

install_torch
pin_torch
"$PY" -m pip install -q -r requirements.txt
# --no-deps: requirements.txt already holds them, and pip must not re-resolve torch.
"$PY" -m pip install -q --no-deps -e .
"$PY" -c "import torch, megatron.core, minitron_mcore; print('setup: ok - torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| cuda', torch.cuda.is_available())"
