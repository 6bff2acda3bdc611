"""Benchmark: ``minitron import-hf`` on a ~1B-parameter Llama vs ``transformers`` loading it.

Run from the repository root, in the project's virtualenv::

    python benchmarks/bench_import_hf.py [--work-dir /tmp/minitron_bench] [--repeats 1] [--keep]

What it does:

1. Once, caches in ``WORK_DIR`` a random Llama-3.2-1B-shaped model (hidden 2048, FFN 8192,
   16 layers, 32 heads, 8 KV heads, vocab 128256, tied embeddings: 1.24B parameters) in bf16,
   saved with ``save_pretrained`` as safetensors, plus a small BPE tokenizer trained locally
   (``minitron_mcore.testing.hf_models.make_tokenizer``; its 512 tokens are fewer than the model's
   vocab rows, which ``import-hf`` and ``transformers`` both accept).
2. For each repeat, runs as separate subprocesses, one after the other:
   - ``transformers load``: ``AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.bfloat16)``;
   - ``transformers load+touch``: the same, then one byte of every page of every weight read.
     transformers >= 5 maps bf16 safetensors zero-copy, so ``from_pretrained`` alone leaves the
     weights on disk (peak RSS far below the checkpoint size); touching them gives the cost of
     actually having the model in memory, as a first forward pass would;
   - ``python -m minitron_mcore import-hf load=HF_DIR save=WORK_DIR/ckpt-N``.
   Each is measured as a whole process (interpreter start and imports included): wall time, peak
   RSS from ``/usr/bin/time -v`` (the kernel's high-water mark of the largest process in the
   tree) when that tool exists, and the sum of RSS over the process tree sampled every 50 ms with
   psutil (the only measure when ``/usr/bin/time`` is absent).
3. Prints a table and the ratios (import-hf / each transformers baseline for wall time and peak
   RSS, peak RSS / checkpoint size on disk), then one JSON line with every figure (medians over
   the repeats).

Exit status is non-zero if any measured subprocess fails; its stderr tail is printed.
``--keep`` keeps the import-hf output checkpoints (the cached HF model is always kept).
``--num-layers`` / ``--vocab-size`` shrink the model for a quick check of the script itself.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import GIB, POLL_SECONDS, Run, median_of, summary  # noqa: E402

SPEC_FILE = "bench_spec.json"
# Llama-3.2-1B's shapes (RoPE included); the tokenizer is a tiny local one.
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
    initializer_range=0.02,
)

# The baseline subprocess: load the checkpoint the way a user of transformers would, in bf16, and
# print the in-process time (imports excluded) as one JSON line.  transformers >= 5 keeps bf16
# weights as zero-copy views of the mmap-ed safetensors file, so ``from_pretrained`` alone reads
# almost nothing: with argv[2] == "touch" it then reads one byte of every 4 KiB page of every
# parameter, which faults the whole checkpoint in as a first forward pass would.
BASELINE_CODE = """
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], dtype=torch.bfloat16, local_files_only=True
)
load_seconds = time.perf_counter() - t0
if sys.argv[2] == "touch":
    with torch.no_grad():
        for p in model.parameters():
            p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
seconds = time.perf_counter() - t0
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"seconds": round(seconds, 3), "load_seconds": round(load_seconds, 3),
                  "params": params}))
"""

# The measured sides: key -> label.  The import-hf side is compared with each baseline.
SIDES = {
    "transformers": "transformers load",
    "transformers_touch": "transformers load+touch",
    "import_hf": "minitron import-hf",
}
BASELINES = ("transformers", "transformers_touch")


# ---------------------------------------------------------------------------- the model


def model_spec(num_layers: int, vocab_size: int) -> dict:
    return dict(LLAMA_1B, num_hidden_layers=num_layers, vocab_size=vocab_size)


def _stamped(stamp: str, spec: dict) -> bool:
    """Whether ``stamp`` records ``spec`` (what a cached output was made from)."""
    if not os.path.isfile(stamp):
        return False
    with open(stamp) as f:
        return json.load(f) == spec


def _stamp(stamp: str, spec: dict) -> None:
    with open(stamp, "w") as f:
        json.dump(spec, f, indent=2, sort_keys=True)


def _clear(path: str) -> None:
    """Remove ``path`` and what an interrupted write left of it."""
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path + ".partial", ignore_errors=True)


def ensure_hf_model(work_dir: str, spec: dict) -> str:
    """The cached random bf16 model for ``spec`` under ``work_dir``; created if absent."""
    name = f"llama-bf16-l{spec['num_hidden_layers']}-v{spec['vocab_size']}"
    path = os.path.join(work_dir, name)
    if _stamped(os.path.join(path, SPEC_FILE), spec):
        print(f"using cached model {path}")
        return path
    print(f"creating random model {path} (once; cached for later runs) ...", flush=True)
    t0 = time.perf_counter()
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    # A copy: LlamaConfig adds rope_theta to the rope_scaling dict it is given, which would
    # change the spec stamped below (and LLAMA_1B's) and miss this cache on every later run.
    _write_random_llama(tmp, copy.deepcopy(spec))
    _stamp(os.path.join(tmp, SPEC_FILE), spec)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    print(f"created in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def _write_random_llama(out_dir: str, spec: dict) -> None:
    """``save_pretrained`` a randomly initialised bf16 Llama plus a locally trained tokenizer.

    The model is instantiated directly in bf16 (about 2 bytes per parameter of memory); the
    Hugging Face initialisation draws the weights from N(0, initializer_range) and sets the norms
    to one, seeded for reproducibility."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from minitron_mcore.testing.hf_models import make_tokenizer

    os.makedirs(out_dir)
    make_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    config = LlamaConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **spec,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model


def weights_bytes(hf_dir: str) -> int:
    """Size on disk of the checkpoint's safetensors files."""
    return sum(
        os.path.getsize(os.path.join(hf_dir, f))
        for f in os.listdir(hf_dir)
        if f.endswith(".safetensors")
    )


def dir_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


# ---------------------------------------------------------------------------- reporting


def import_cmd(hf_dir: str, ckpt: str, extra=()) -> list[str]:
    cmd = [sys.executable, "-m", "minitron_mcore", "import-hf", f"load={hf_dir}", f"save={ckpt}"]
    return cmd + list(extra)


def cached_import(hf_dir: str, ckpt: str, spec: dict, time_file: str, extra=()):
    """``minitron import-hf load=hf_dir save=ckpt [extra]``, measured, or the checkpoint a
    previous run made from the same ``spec``; returns (ckpt, import Run or None)."""
    stamp = ckpt + ".spec.json"
    if os.path.isfile(os.path.join(ckpt, "minitron.json")) and _stamped(stamp, spec):
        print(f"using cached checkpoint {ckpt}")
        return ckpt, None
    _clear(ckpt)
    print(f"importing {hf_dir} -> {ckpt} (once; cached for later runs) ...", flush=True)
    run = harness.measure_ok("import-hf", import_cmd(hf_dir, ckpt, extra), time_file)
    _stamp(stamp, spec)
    return ckpt, run


def compute_ratios(runs: dict[str, list[Run]], ckpt_bytes: int) -> dict[str, float]:
    """import-hf over each baseline (wall time, peak RSS) and every side's peak RSS over the
    checkpoint size; medians over the repeats."""
    wall = {k: median_of(rs, "wall_s") for k, rs in runs.items()}
    rss = {k: median_of(rs, "peak_rss_bytes") for k, rs in runs.items()}
    ratios = {}
    for b in BASELINES:
        ratios[f"time_import_hf_over_{b}"] = wall["import_hf"] / wall[b]
        ratios[f"peak_rss_import_hf_over_{b}"] = rss["import_hf"] / rss[b]
    for k in SIDES:
        ratios[f"peak_rss_{k}_over_ckpt_size"] = rss[k] / ckpt_bytes
    return ratios


# One row per measured process (the columns bench_prune.py prints too, before its own).
RUN_ROW = "{run:>4}{wall:>9.1f}{inner:>11}{rss:>14.2f}{tree:>{tree_w}.2f}{procs:>7}"
RUN_TITLES = dict(run="run", wall="wall s", inner="in-proc s", rss="peak RSS GiB", procs="procs")


def run_row(i: int, r: Run, **more) -> dict:
    """``RUN_ROW``'s fields for the ``i``-th run ``r`` (and ``more``)."""
    inner = f"{r.inner_s:.1f}" if r.inner_s is not None else "-"
    rss, tree = r.peak_rss_bytes / GIB, r.sampled_tree_rss_bytes / GIB
    return dict(
        run=i + 1, wall=r.wall_s, inner=inner, rss=rss, tree=tree, procs=r.max_procs, **more
    )


def print_table(runs: dict[str, list[Run]], ckpt_bytes: int, ratios: dict[str, float]) -> None:
    row = ("{side:<24}" + RUN_ROW).replace("{tree_w}", "18")
    rows = [run_row(i, r, side=SIDES[k]) for k, rs in runs.items() for i, r in enumerate(rs)]
    print()
    print(harness.fixed_table(row, dict(RUN_TITLES, side="", tree="tree RSS sum GiB"), rows))
    print("wall s: whole subprocess; in-proc s: the process's own timing (imports excluded)")
    print(f"peak RSS: {runs['import_hf'][0].rss_method}")
    print(
        f"tree RSS sum: RSS summed over the process tree every {POLL_SECONDS * 1000:.0f} ms "
        "(counts pages a forked child shares with its parent twice: an upper bound); "
        "procs: most processes at once"
    )
    print(f"checkpoint on disk (safetensors): {ckpt_bytes / GIB:.2f} GiB")
    print()
    print("ratios (medians over repeats):")
    for b in BASELINES:
        print(
            f"  import-hf / {SIDES[b]:<24} wall time {ratios[f'time_import_hf_over_{b}']:6.2f}"
            f"   peak RSS {ratios[f'peak_rss_import_hf_over_{b}']:6.2f}"
        )
    for k in SIDES:
        ratio = ratios[f"peak_rss_{k}_over_ckpt_size"]
        print(f"  peak RSS / checkpoint size, {SIDES[k]:<24}{ratio:6.2f}")


# ---------------------------------------------------------------------------- main


def add_model_args(p) -> None:
    """The flags that shrink the source model (for a quick check of a script)."""
    p.add_argument("--num-layers", type=int, default=LLAMA_1B["num_hidden_layers"])
    p.add_argument("--vocab-size", type=int, default=LLAMA_1B["vocab_size"])


def parse_args(argv: list[str] | None = None):
    p = harness.parser(__doc__)
    harness.add_runs_args(
        p, "measured runs of each side", keep_help="keep the import-hf output checkpoints"
    )
    add_model_args(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    spec = model_spec(args.num_layers, args.vocab_size)
    hf_dir = ensure_hf_model(work_dir, spec)
    ckpt_bytes = weights_bytes(hf_dir)
    time_file = os.path.join(work_dir, "time-v.txt")
    load_before = harness.load_before()

    runs: dict[str, list[Run]] = {k: [] for k in SIDES}
    out_bytes = None
    for i in range(args.repeats):
        out = os.path.join(work_dir, f"ckpt-{i + 1}")
        _clear(out)
        cmds = {
            "transformers": [sys.executable, "-c", BASELINE_CODE, hf_dir, "load"],
            "transformers_touch": [sys.executable, "-c", BASELINE_CODE, hf_dir, "touch"],
            "import_hf": import_cmd(hf_dir, out),
        }
        for key, cmd in cmds.items():
            print(f"[{i + 1}/{args.repeats}] {SIDES[key]} ...", flush=True)
            runs[key].append(harness.measure_ok(SIDES[key], cmd, time_file))
        out_bytes = dir_bytes(out)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    params = harness.last_json_line(runs["transformers"][0].stdout).get("params")
    extra = {
        **harness.host_info(load_before),
        "params": params,
        "spec": {k: spec[k] for k in ("num_hidden_layers", "hidden_size", "vocab_size")},
        "repeats": args.repeats,
        "import_out_bytes": out_bytes,
        "hf_dir": hf_dir,
    }
    print(f"\nmodel: {hf_dir} ({params / 1e9:.3f}B params, bf16)")
    ratios = compute_ratios(runs, ckpt_bytes)
    print_table(runs, ckpt_bytes, ratios)
    result = {
        "benchmark": "import_hf",
        **extra,
        "ckpt_bytes": ckpt_bytes,
        **{k: summary(rs) for k, rs in runs.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
