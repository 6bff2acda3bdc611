#!/usr/bin/env bash
# The Minitron pipeline on the built-in demo corpus, on CPU, in a few minutes:
#   1. pretrain a small Llama-3-style model on demo:stdlib-code and export it to Hugging Face
#      format: it stands in for "your Hugging Face model";
#   2. import it into a Megatron checkpoint split over 2 tensor-parallel processes;
#   3. teacher correction on the distillation data (demo:stdlib-docs), papers' recipe;
#   4. activation importance on calibration samples, at TP=2;
#   5. prune width (hidden 128->96, ffn 384->256, heads 8->4) and depth (4->3 layers);
#   6. evaluate teacher and pruned student on held-out data;
#   7. retrain the student by knowledge distillation from the corrected teacher (TP=2);
#   8. evaluate the distilled student: the pruned and distilled losses side by side;
#   9. export the distilled student to Hugging Face format and run it with stock transformers.
#
#   bash examples/compress_demo.sh [RUN_DIR]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUN=${1:-runs/demo}
source "$HERE/run_dir.sh" && fresh_run_dir "$RUN" compress_demo
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA="data.cache_dir=$RUN/data"
TP2=(torchrun --standalone --nproc-per-node 2 -m minitron_mcore)

echo "== 1. a small model to compress (pretrained here; normally your HF model)"
python -c "import sys; from minitron_mcore.testing.hf_models import make_tokenizer as m; m(sys.argv[1])" \
  "$RUN/tokenizer"
minitron pretrain model=tiny-llama model.hidden_size=128 model.ffn_hidden_size=384 \
  model.num_attention_heads=8 model.num_query_groups=4 model.kv_channels=16 \
  tokenizer="$RUN/tokenizer" save="$RUN/base" "$DATA" data.train=[demo:stdlib-code] \
  train.steps=200 train.seq_length=128 train.global_batch_size=16 train.micro_batch_size=8 \
  train.lr=3e-3 train.warmup_steps=10 train.eval_iters=0
minitron export-hf load="$RUN/base" save="$RUN/teacher-hf"

echo "== 2. import at TP=2"
"${TP2[@]}" import-hf load="$RUN/teacher-hf" save="$RUN/teacher" parallel.tp=2

echo "== 3. teacher correction on the distillation data"
"${TP2[@]}" correct load="$RUN/teacher" save="$RUN/teacher-corrected" original_lr=3e-3 \
  "$DATA" data.train=[demo:stdlib-docs] train.steps=40 train.warmup_steps=10 \
  train.seq_length=128 train.global_batch_size=16 train.micro_batch_size=8 train.eval_iters=0 \
  parallel.tp=2

echo "== 4. importance (TP=2)"
"${TP2[@]}" importance load="$RUN/teacher-corrected" save="$RUN/scores" "$DATA" \
  data.train=[demo:stdlib-docs] importance.num_samples=128 importance.seq_length=128 \
  importance.layer_loss_samples=32 importance.block_sizes=[1] parallel.tp=2

echo "== 5. prune width and depth"
minitron prune load="$RUN/teacher-corrected" scores="$RUN/scores" save="$RUN/student" \
  prune.target.hidden_size=96 prune.target.ffn_hidden_size=256 \
  prune.target.num_attention_heads=4 prune.target.num_layers=3

echo "== 6. evaluate teacher and student (before any retraining)"
EVAL=("$DATA" data.valid=[demo:stdlib-docs] seq_length=128 iters=8 global_batch_size=16 micro_batch_size=8)
minitron evaluate load="$RUN/teacher-corrected" "${EVAL[@]}"
minitron evaluate load="$RUN/student" "${EVAL[@]}"

echo "== 7. retrain the student by distillation from the corrected teacher (TP=2)"
"${TP2[@]}" distill load="$RUN/student" teacher="$RUN/teacher-corrected" save="$RUN/student-kd" \
  "$DATA" data.train=[demo:stdlib-docs] train.steps=80 train.lr=3e-3 train.min_lr=3e-4 \
  train.warmup_steps=8 train.seq_length=128 train.global_batch_size=16 train.micro_batch_size=8 \
  train.eval_iters=0 parallel.tp=2

echo "== 8. evaluate the distilled student"
minitron evaluate load="$RUN/student-kd" "${EVAL[@]}"
python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
rows = [("teacher (corrected)", "teacher-corrected"), ("student, pruned", "student"),
        ("student, distilled", "student-kd")]
print(f"{'model':<22} {'valid loss':>10} {'ppl':>9}   (demo:stdlib-docs)")
for name, d in rows:
    with open(f"{run}/{d}.eval/metrics.json") as f:
        m = json.load(f)
    print(f"{name:<22} {m['valid_loss']:>10.4f} {m['valid_ppl']:>9.2f}")
PY

echo "== 9. export the distilled student and run it with transformers"
minitron export-hf load="$RUN/student-kd" save="$RUN/student-hf"
python "$HERE/run_hf.py" "$RUN/student-hf" "Return the"
echo "compress demo: ok - outputs in $RUN (student checkpoint: $RUN/student-kd, HF: $RUN/student-hf)"
