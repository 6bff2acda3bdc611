#!/usr/bin/env bash
# Launch any minitron command on one or several nodes with torchrun.
#
#   launch/torchrun.sh import-hf load=HF save=CKPT parallel.tp=8            # one node, all GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh distill ...  # on each node
#   launch/torchrun.sh --dry-run distill ...    # (or DRY_RUN=1) print the command, run nothing
#
# Only the environment is translated; every hyper-parameter is a Hydra override, passed on to
# `python -m minitron_mcore` verbatim ("$@").
#
# Environment:
#   NPROC_PER_NODE  processes on this node (default: the GPU count, or 2 without a GPU)
#   NNODES (1), NODE_RANK (0)
#   MASTER_ADDR     host of node 0 (default 127.0.0.1; required when NNODES > 1)
#   MASTER_PORT     default inside a SLURM job 10000 + SLURM_JOB_ID mod 20000, so two jobs
#                   sharing a node do not collide; 29500 otherwise
#   CUDA_DEVICE_MAX_CONNECTIONS  set to 1 when a GPU is present (Megatron's requirement for
#                   overlapping tensor-parallel communication with computation); kept if set
#   DRY_RUN=1       same as --dry-run
set -euo pipefail

dry_run=0
case "${DRY_RUN:-0}" in 0 | "" | false | no) ;; *) dry_run=1 ;; esac
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi

# Shell words that paste back into a shell: quoted only when they need it.
quote() {
  local out=() word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# GPUs: torch's count (it honours CUDA_VISIBLE_DEVICES) when NPROC_PER_NODE is to be derived
# from it; with NPROC_PER_NODE given, a quicker look at nvidia-smi than importing torch (grep
# without -q: under pipefail an early exit of `grep -q` could fail the pipe).
if [ -z "${NPROC_PER_NODE:-}" ]; then
  gpus=$(python -c "import torch; print(torch.cuda.device_count())")
  if [ "$gpus" -gt 0 ]; then NPROC_PER_NODE=$gpus; else NPROC_PER_NODE=2; fi
elif command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep "^GPU" >/dev/null; then
  gpus=1
else
  gpus=0
fi
if [ "$gpus" -gt 0 ]; then
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
fi
exports=()
if [ -n "${CUDA_DEVICE_MAX_CONNECTIONS:-}" ]; then exports+=(CUDA_DEVICE_MAX_CONNECTIONS); fi

NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (the host of node 0), the same" \
    "on every node" >&2
  exit 2
fi
if [ -z "${MASTER_PORT:-}" ]; then
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
  else
    MASTER_PORT=29500
  fi
fi

cmd=(torchrun
  --nproc-per-node "$NPROC_PER_NODE"
  --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}"
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "$MASTER_PORT"
  -m minitron_mcore "$@")

if [ "$dry_run" = 1 ]; then
  echo "# launch/torchrun.sh --dry-run: nothing was started"
  for name in ${exports[@]+"${exports[@]}"}; do
    echo "export $name=$(quote "${!name}")"
  done
  quote "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
