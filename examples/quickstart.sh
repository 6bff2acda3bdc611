#!/usr/bin/env bash
# CPU quickstart (about a minute): a tiny random Llama-3 in Hugging Face format is imported into
# a Megatron checkpoint split over 2 tensor-parallel processes, exported back, and checked
# against the original with stock transformers.
#
#   bash examples/quickstart.sh [RUN_DIR]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUN=${1:-runs/quickstart}
source "$HERE/run_dir.sh" && fresh_run_dir "$RUN" quickstart
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

python "$HERE/make_tiny_hf.py" --family llama --out "$RUN/hf"
torchrun --standalone --nproc-per-node 2 -m minitron_mcore import-hf load="$RUN/hf" save="$RUN/ckpt" parallel.tp=2
minitron export-hf load="$RUN/ckpt" save="$RUN/hf-export"
python "$HERE/check_logits.py" "$RUN/hf" "$RUN/hf-export"
echo "quickstart: ok - outputs in $RUN"
