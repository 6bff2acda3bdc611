"""Benchmark: ``minitron prune`` wall time and peak RSS on a ~1B-parameter checkpoint vs its size.

Run from the repository root, in the project's virtualenv::

    python benchmarks/bench_prune.py [--work-dir /tmp/minitron_bench] [--repeats 1] [--keep]

What it does:

1. Reuses (or creates once) the random bf16 Llama-3.2-1B-shaped HF model of
   ``bench_import_hf.py`` (1.24B parameters, same cache directory and writer), and imports it
   once with ``python -m minitron_mcore import-hf load=HF save=WORK_DIR/prune/ckpt-...`` (cached;
   bf16, like the source).
2. Writes a hand-made importance-scores directory for that checkpoint (running the real
   ``minitron importance`` on 1B parameters on a CPU would take hours): random per-layer
   ``heads`` / ``mlp`` / ``hidden`` scores for the ``mean-l2`` aggregation, ``layer_bi`` and
   ``layer_loss.block{n}`` for n = 1 and n = L - ``--target-layers``, with the checkpoint's id
   and arch in ``scores.json`` (``minitron_mcore.importance.scores.Scores.save``), so ``prune``
   accepts it.
3. For each repeat, measures as whole subprocesses (interpreter start and imports included),
   with ``harness.measure`` (wall time; peak RSS from ``/usr/bin/time -v``, the kernel's
   high-water mark of the largest process of the tree; the psutil tree-sum as an upper bound):

   - ``width``: ``python -m minitron_mcore prune load=CKPT scores=SCORES save=OUT
     prune.target.hidden_size=1536 prune.target.ffn_hidden_size=6144``;
   - ``depth``: ``python -m minitron_mcore prune load=CKPT scores=SCORES save=OUT
     prune.target.num_layers=8`` (the default ``prune.depth_metric=block_loss``);
   - ``start-up only``: ``python -c`` importing ``minitron_mcore.prune.command`` and opening and
     closing a one-rank ``parallel_context``: the fixed time and RSS any such process pays.

4. Prints a table (wall time, the command's own ``seconds``, peak RSS, pruned checkpoint size,
   peak RSS / source checkpoint size, peak RSS / (source + pruned size)) and one JSON line.

Checkpoint sizes are the bytes of the files under ``CKPT/weights`` (``du -sb`` of it).  Needs
about 2.5 GiB of disk for the HF model, 2.5 GiB for the imported checkpoint, up to 2 GiB per kept
output, and about 8 GiB of free RAM.  ``--num-layers`` / ``--vocab-size`` shrink the source
model for a quick check of the script itself.  Exits non-zero, with the failing command's stderr
tail, if a step fails.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_import_hf as bih  # noqa: E402  (the sibling benchmark: model writer, its table)
import harness  # noqa: E402
from harness import GIB  # noqa: E402

SEED = 1234
AGG = "mean-l2"
SIDES = {"width": "prune width", "depth": "prune depth"}
# The fixed cost of any ``minitron`` process: the interpreter, torch + Megatron imports, the
# prune module and a one-rank parallel context (gloo group, Megatron groups, seeds).
STARTUP_CODE = """
import json, time
t0 = time.perf_counter()
import torch
from minitron_mcore.prune import command
from minitron_mcore.parallel import ParallelConfig, parallel_context
with parallel_context(ParallelConfig()):
    pass
print(json.dumps({"seconds": round(time.perf_counter() - t0, 3)}))
"""


def parse_args(argv: list[str] | None = None):
    p = harness.parser(__doc__)
    harness.add_runs_args(p, "measured runs of each prune", keep_help="keep the pruned checkpoints")
    bih.add_model_args(p)
    p.add_argument("--target-hidden", type=int, default=1536, help="width run hidden_size")
    p.add_argument("--target-ffn", type=int, default=6144, help="width run ffn_hidden_size")
    p.add_argument("--target-layers", type=int, default=8, help="depth run num_layers")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if not 1 <= args.target_layers < args.num_layers:
        p.error("--target-layers must be in 1..num_layers-1")
    return args


# ---------------------------------------------------------------------------- inputs


def ensure_checkpoint(hf_dir: str, spec: dict, prune_dir: str, time_file: str):
    """The import-hf checkpoint of ``hf_dir``, cached; returns (path, import Run or None)."""
    ckpt = os.path.join(prune_dir, f"ckpt-{os.path.basename(hf_dir)}")
    return bih.cached_import(hf_dir, ckpt, spec, time_file)


def write_scores(ckpt: str, path: str, blocks: list[int]) -> dict:
    """A random importance-scores directory that ``prune`` accepts for ``ckpt``."""
    import torch

    from minitron_mcore.checkpoint.megatron import read_meta
    from minitron_mcore.importance.scores import Scores

    meta = read_meta(ckpt)
    a = meta.arch
    g = torch.Generator().manual_seed(SEED)
    tensors = {}
    for i in range(a.num_layers):
        for site, n in (
            ("heads", a.num_attention_heads),
            ("mlp", a.ffn_hidden_size),
            ("hidden", a.hidden_size),
        ):
            tensors[f"layer{i}.{site}.{AGG}"] = torch.rand(n, generator=g)
    tensors["layer_bi"] = torch.rand(a.num_layers, generator=g)
    for n in sorted(set(blocks)):
        tensors[f"layer_loss.block{n}"] = 2.0 + torch.rand(a.num_layers - n + 1, generator=g)
    tensors["base_loss"] = torch.tensor(2.0)
    info = {
        "format": 1,
        "checkpoint": os.path.abspath(ckpt),
        "checkpoint_id": meta.checkpoint_id,
        "arch": a.to_dict(),
        "default_agg": AGG,
        "block_sizes": sorted(set(blocks)),
        "note": "random scores written by benchmarks/bench_prune.py",
    }
    shutil.rmtree(path, ignore_errors=True)
    Scores(tensors, info).save(path)
    return {"arch": a.to_dict(), "dtype": meta.dtype, "params": a.num_params()}


def weights_dir_bytes(ckpt: str) -> int:
    from minitron_mcore.checkpoint.megatron import resolve_checkpoint

    return bih.dir_bytes(os.path.join(resolve_checkpoint(ckpt), "weights"))


def layer_bytes(arch: dict, nbytes: int) -> int:
    """Bytes of one transformer layer of ``arch`` (no biases) in a dtype of ``nbytes``."""
    h, f, d = arch["hidden_size"], arch["ffn_hidden_size"], arch["kv_channels"]
    q, kv = arch["num_attention_heads"] * d, arch["num_query_groups"] * d
    return nbytes * (h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h)


# ---------------------------------------------------------------------------- main


def prune_cmd(ckpt: str, scores: str, out: str, targets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "minitron_mcore", "prune", f"load={ckpt}", f"scores={scores}"]
    return cmd + [f"save={out}", *targets]


def print_table(runs: dict, startup: list, ckpt_bytes: int, out_bytes: dict, ref: dict) -> None:
    start = ("{side:<14}" + bih.RUN_ROW).replace("{tree_w}", "14")
    row = start + "{out:>9.2f}{per_ckpt:>10.2f}{per_both:>15.2f}"
    rows = []
    for key, rs in runs.items():
        for i, r in enumerate(rs):
            out = out_bytes[key]
            ratios = dict(per_ckpt=r.peak_rss_bytes / ckpt_bytes)
            ratios["per_both"] = r.peak_rss_bytes / (ckpt_bytes + out)
            rows.append(bih.run_row(i, r, side=SIDES[key], out=out / GIB, **ratios))
    for i, r in enumerate(startup):
        inner = f"{r.inner_s or 0:.1f}"
        rows.append(start.format(**dict(bih.run_row(i, r, side="start-up only"), inner=inner)))
    titles = dict(bih.RUN_TITLES, side="", tree="tree sum GiB", out="out GiB")
    titles.update(per_ckpt="RSS/ckpt", per_both="RSS/(src+dst)")
    print()
    print(harness.fixed_table(row, titles, rows))
    print(f"peak RSS: {runs['width'][0].rss_method}; tree sum: psutil, every 50 ms (upper bound)")
    print("in-proc s: the command's own `seconds` (imports excluded); out: pruned weights/")
    print("start-up only: python + imports + a 1-rank parallel context (the fixed cost)")
    print(f"source checkpoint on disk (weights/): {ckpt_bytes / GIB:.2f} GiB ({ckpt_bytes:,} B)")
    print(
        f"one source layer: {ref['src_layer_bytes'] / GIB:.3f} GiB; 'one copy of the model plus "
        f"one layer' = {(ckpt_bytes + ref['src_layer_bytes']) / GIB:.2f} GiB"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = os.path.abspath(args.work_dir)
    prune_dir = os.path.join(work_dir, "prune")
    os.makedirs(prune_dir, exist_ok=True)
    time_file = os.path.join(prune_dir, "time-v.txt")
    spec = bih.model_spec(args.num_layers, args.vocab_size)
    hf_dir = bih.ensure_hf_model(work_dir, spec)
    ckpt, import_run = ensure_checkpoint(hf_dir, spec, prune_dir, time_file)
    depth_block = args.num_layers - args.target_layers
    scores = os.path.join(prune_dir, "scores-random")
    src = write_scores(ckpt, scores, [1, depth_block])
    ckpt_bytes = weights_dir_bytes(ckpt)
    nbytes = {"bf16": 2, "fp16": 2, "fp32": 4}[src["dtype"]]
    ref = {"src_layer_bytes": layer_bytes(src["arch"], nbytes)}

    load_before = harness.load_before()
    targets = {
        "width": [
            f"prune.target.hidden_size={args.target_hidden}",
            f"prune.target.ffn_hidden_size={args.target_ffn}",
        ],
        "depth": [f"prune.target.num_layers={args.target_layers}"],
    }
    runs: dict[str, list] = {k: [] for k in SIDES}
    startup: list = []
    out_bytes, metrics = {}, {}
    for i in range(args.repeats):
        print(f"[{i + 1}/{args.repeats}] start-up baseline ...", flush=True)
        startup.append(
            harness.measure_ok("start-up", [sys.executable, "-c", STARTUP_CODE], time_file)
        )
        for key in SIDES:
            out = os.path.join(prune_dir, f"out-{key}-{i + 1}")
            bih._clear(out)
            print(f"[{i + 1}/{args.repeats}] {SIDES[key]} ...", flush=True)
            run = harness.measure_ok(
                SIDES[key], prune_cmd(ckpt, scores, out, targets[key]), time_file
            )
            runs[key].append(run)
            out_bytes[key] = weights_dir_bytes(out)
            metrics[key] = harness.last_json_line(run.stdout) or {}
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)

    print(f"\nsource: {ckpt} ({src['params'] / 1e9:.3f}B params, {src['dtype']})")
    for key in SIDES:
        m = metrics[key]
        after = m.get("params_after")
        after_txt = f"{after / 1e9:.3f}B params" if after else "?"
        print(f"  {SIDES[key]}: {' '.join(targets[key])} -> {after_txt}", end="")
        print(f", kept layers {m.get('kept_layers')}" if key == "depth" else "")
    print_table(runs, startup, ckpt_bytes, out_bytes, ref)
    load_after = harness.load_after(load_before)

    result = {
        "benchmark": "prune",
        **harness.host_info(load_before, load_after),
        "params": src["params"],
        "dtype": src["dtype"],
        "spec": {k: spec[k] for k in ("num_hidden_layers", "hidden_size", "vocab_size")},
        "repeats": args.repeats,
        "ckpt": ckpt,
        "ckpt_bytes": ckpt_bytes,
        "src_layer_bytes": ref["src_layer_bytes"],
        "import_hf": harness.summary([import_run]) if import_run else None,
        "startup": harness.summary(startup),
    }
    for key, rs in runs.items():
        rss = harness.median_of(rs, "peak_rss_bytes")
        result[key] = {
            **harness.summary(rs),
            "targets": targets[key],
            "params_after": metrics[key].get("params_after"),
            "kept_layers": metrics[key].get("kept_layers"),
            "out_bytes": out_bytes[key],
            "peak_rss_over_ckpt": round(rss / ckpt_bytes, 3),
            "peak_rss_over_src_plus_dst": round(rss / (ckpt_bytes + out_bytes[key]), 3),
        }
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
