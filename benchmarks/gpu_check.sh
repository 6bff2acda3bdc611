#!/usr/bin/env bash
# The GPU check in one command, from the repository root on a machine with one (or more) GPUs:
#
#   bash benchmarks/gpu_check.sh             # GPU test set, then the GPU training benchmark
#   bash benchmarks/gpu_check.sh --dry-run   # print the commands, run nothing (works anywhere)
#
# In an NGC PyTorch container: `PIP_CONSTRAINT='' bash setup.sh` first. Two parts, each under
# `timeout` so that a hung part cannot eat the other's time (the whole check stays under 10
# minutes on one H100):
#   1. `python3 -m pytest -q -m gpu` - the GPU test set (tests/gpu/; ~5 min on one H100;
#      the 2-GPU cases are skipped, with the reason, on one GPU);
#   2. `python3 benchmarks/bench_train.py --device cuda` - tokens/s, MFU and peak memory of
#      our training step against a `transformers` loop on an 8B-shaped layer stack.
# Then one table: the tests' outcome counts and the benchmark's figures. Logs, the tests'
# JUnit XML and the benchmark's output stay in $GPU_CHECK_DIR.
#
# Exit status: 0 when every test passed or was skipped and the benchmark finished; 1 when
# something failed or timed out; 2 without a GPU (one line says so) or on a bad argument.
#
# Environment:
#   PYTHON (python3), GPU_CHECK_DIR (runs/gpu_check)
#   TESTS_TIMEOUT (390 s), BENCH_TIMEOUT (180 s)
#   PYTEST_ARGS, BENCH_ARGS   extra arguments for each part (e.g. BENCH_ARGS="--micro-batch 1")
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${GPU_CHECK_DIR:-runs/gpu_check}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-390}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-180}

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  -h | --help)
    sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "gpu_check: unknown argument ${1}; use --dry-run or nothing" >&2
    exit 2
    ;;
esac

# Word-split on purpose: the extra arguments are plain options.
# shellcheck disable=SC2206
TESTS_CMD=(timeout --kill-after=20 "$TESTS_TIMEOUT" "$PY" -m pytest -q -m gpu -rs
  --junitxml="$OUT/tests.xml" ${PYTEST_ARGS:-})
# shellcheck disable=SC2206
BENCH_CMD=(timeout --kill-after=20 "$BENCH_TIMEOUT" "$PY" benchmarks/bench_train.py
  --device cuda ${BENCH_ARGS:-})

if [ "$dry_run" = 1 ]; then
  echo "gpu_check: dry run in $(pwd); would run:"
  echo "  ${TESTS_CMD[*]} 2>&1 | tee $OUT/tests.log"
  echo "  ${BENCH_CMD[*]} 2>&1 | tee $OUT/bench.log"
  exit 0
fi

# torch's own answer (it honours CUDA_VISIBLE_DEVICES), as the tests and the benchmark see it.
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is not True); run it on a GPU machine, or with --dry-run to see the commands" >&2
  exit 2
fi

mkdir -p "$OUT"
rm -f "$OUT"/tests.{xml,log,status} "$OUT"/bench.{log,status}

# run NAME CMD...: run a part, tee its output to $OUT/NAME.log, record its status and time.
run() {
  local name=$1 start
  shift
  echo "+ $*"
  start=$(date +%s)
  "$@" 2>&1 | tee "$OUT/$name.log"
  local status=${PIPESTATUS[0]}
  echo "$status $(($(date +%s) - start))" >"$OUT/$name.status"
}

run tests "${TESTS_CMD[@]}"
run bench "${BENCH_CMD[@]}"

"$PY" - "$OUT" "$TESTS_TIMEOUT" "$BENCH_TIMEOUT" <<'EOF'
"""The summary table: outcome counts from the JUnit XML, figures from the benchmark's JSON."""

import json
import os
import sys
import xml.etree.ElementTree as ET

out, limits = sys.argv[1], {"tests": sys.argv[2], "bench": sys.argv[3]}
SHOWN = ("passed", "failures", "errors", "skipped")  # JUnit's counts, and "passed" from them


def status(name):
    code, seconds = open(os.path.join(out, f"{name}.status")).read().split()
    code = int(code)
    timed_out = code in (124, 137)  # timeout's TERM, then its KILL
    return code, int(seconds), f"timed out after {limits[name]} s" if timed_out else ""


def test_counts():
    path = os.path.join(out, "tests.xml")
    if not os.path.isfile(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    kinds = ("tests", "failures", "errors", "skipped")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in kinds}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n


def bench_json():
    try:
        lines = open(os.path.join(out, "bench.log")).read().strip().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


ok = True
rows = []
code, secs, why = status("tests")
n = test_counts()
if n is None:
    rows.append(("GPU tests", f"no result ({why or f'exit {code}'}), {secs} s"))
    ok = False
else:
    text = ", ".join(f"{n[k]} {k.replace('failures', 'failed')}" for k in SHOWN)
    rows.append(("GPU tests", f"{text}, {secs} s" + (f" - {why}" if why else "")))
    ok &= n["failures"] == 0 and n["errors"] == 0 and not why and n["tests"] > 0
code, secs, why = status("bench")
b = bench_json()
rows.append(("benchmark", f"exit {code}, {secs} s" + (f" - {why}" if why else "")))
ok &= code == 0 and b is not None

print()
print(f"{'part':<12}result")
print("-" * 72)
for part, text in rows:
    print(f"{part:<12}{text}")
if b is not None:
    m = b["model"]
    print()
    print(
        f"bench_train --device cuda on {b['gpu']['name']}: bf16, {m['num_layers']} layers of "
        f"h={m['hidden_size']} ffn={m['ffn_hidden_size']} vocab={m['vocab_size']}, "
        f"{b['micro_batch']} x {b['seq_len']} tokens; MFU vs {b['peak_flops_source']}"
    )
    print(f"{'side':<14}{'tokens/s':>10}{'MFU':>8}{'peak GiB':>10}")
    for side in ("transformers", "ours"):
        r = b["results"][side]["bf16"]
        if r.get("ok"):
            print(f"{side:<14}{r['tokens_per_s']:>10.0f}{r['mfu']:>8.1%}{r['peak_mem_gib']:>10.1f}")
        else:
            peak = r.get("peak_mem_gib")
            peak = f" (peak {peak:.1f} GiB)" if peak is not None else ""
            print(f"{side:<14}FAILED: {r.get('error', '?')}{peak}")
    ratio, mem = b["ratio_tokens_per_s"]["bf16"], b["ratio_peak_memory"]["bf16"]
    if ratio is not None:
        print(f"ours / transformers: tokens/s {ratio:.2f}x, peak memory {mem:.2f}x")
print()
print(f"gpu_check: {'ok' if ok else 'FAILED'} (logs in {out}/)")
sys.exit(0 if ok else 1)
EOF
