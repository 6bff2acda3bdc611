#!/usr/bin/env bash
# Launch any minitron command on one or several nodes with torchrun.
#
#   launch/torchrun.sh import-hf load=HF save=CKPT parallel.tp=8            # one node, all GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh distill ...  # on each node
#
# Environment: NPROC_PER_NODE (default: GPU count, or 2 on CPU), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (inside a SLURM job 10000 + SLURM_JOB_ID mod 20000, so two
# jobs sharing a node do not collide; 29500 otherwise). Only translates the environment to torchrun.
set -euo pipefail
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
if [ -z "${MASTER_PORT:-}" ]; then
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
  else
    MASTER_PORT=29500
  fi
fi
exec torchrun \
  --nproc-per-node "$NPROC_PER_NODE" \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "$MASTER_PORT" \
  -m minitron_mcore "$@"
