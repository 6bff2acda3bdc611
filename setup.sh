#!/usr/bin/env bash
# One-command set-up:  bash setup.sh
#
# Installs minitron_mcore (editable) and its dependencies into the active Python environment.
# * torch: kept as it is when already installed (an NGC container's CUDA build, or your own);
#   otherwise the CPU build of torch==2.13.0 (TORCH_SPEC overrides, e.g. TORCH_SPEC='torch==2.13.0'
#   with your own --index-url in PIP_INDEX_URL). A bare `pip install torch` would pull a
#   multi-GB CUDA build onto a CPU machine, so it is never left to the resolver.
# * Transformer Engine / apex are optional and never installed here (NGC images ship them).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q -r requirements.txt
# --no-deps: requirements.txt already holds them, and pip must not re-resolve torch.
"$PY" -m pip install -q --no-deps -e .
"$PY" -c "import torch, megatron.core, minitron_mcore; print('setup: ok - torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| cuda', torch.cuda.is_available())"
