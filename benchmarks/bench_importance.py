"""Benchmark: importance estimation time vs a plain forward pass over the same calibration batch.

Run from the repository root, in the project's virtualenv::

    python benchmarks/bench_importance.py [--num-samples 64] [--seq-len 256] [--repeats 3] \
        [--layer-loss-samples 16] [--block-sizes 1] [--no-cli] [--work-dir /tmp/minitron_bench]

What it does:

1. In ONE process (``parallel_context``, one rank, the CPU compat layer active): builds a
   Llama-shaped Megatron ``GPTModel`` with ``build_model_for_stage(arch, torch.float32,
   use_te=False)`` (defaults: hidden 512, FFN 1536, 8 layers, 8 heads, 4 KV groups, vocab 8192,
   untied embeddings: 33.6M parameters) and a calibration set of ``--num-samples`` random-token
   samples of ``--seq-len`` tokens, cut into micro-batches of ``--micro-batch`` with one
   micro-batch per global batch (what ``minitron importance`` does on one rank).  Then, after
   one untimed warm-up of each side, ``--repeats`` times (sides interleaved, medians reported):

   (a) ``plain``: ``train.loop.evaluate(model, lm_forward_step(vocab), batches, seq)``;
   (b) ``importance``: ``ActivationCollector(model)``, ``.attach()``, the same ``evaluate``,
       ``.detach()``, then the finalisation ``importance.command._reduce_and_gather`` and
       ``_layer_tensors`` (what the command does before the layer-removal pass);
   (c) ``layer loss`` (unless ``--layer-loss-samples 0``): ``importance.command._layer_losses``
       on the first ``--layer-loss-samples`` samples with ``--block-sizes``, reported as a
       multiple of one plain pass over those same samples (timed alongside), next to the number
       of passes it makes: 1 + sum over block sizes n of (L - n + 1); once restarting each pass
       from cached layer inputs (the default) and once as full passes (cache off).

   The overhead ratio is (b) / (a).  Because whole passes taken one after the other drift with
   the machine's load, each repeat also runs a ``paired`` pass: every micro-batch once plain and
   once hooked, back to back, alternating which goes first; its ratio (hooked time + the
   finalisation over plain time) and the median per-micro-batch ratio are reported too.
2. Unless ``--no-cli``, end to end as separate processes (interpreter start and imports
   included; wall time and the command's own ``seconds`` from its JSON metrics line): a random
   bf16 HF Llama with the same shapes is cached under ``WORK_DIR/importance`` (the model writer
   of ``bench_import_hf.py``), imported once with ``minitron import-hf ... dtype=fp32`` (so that
   ``importance``, which computes in the checkpoint's dtype, and ``evaluate``, fp32 on CPU, use
   the same precision), then per repeat:

   - ``python -m minitron_mcore evaluate load=CKPT data.valid=[demo:stdlib-code]
     seq_length=S global_batch_size=B micro_batch_size=B iters=N/B precision=fp32``;
   - ``python -m minitron_mcore importance load=CKPT save=... data.train=[demo:stdlib-code]
     importance.num_samples=N importance.seq_length=S importance.micro_batch_size=B
     importance.layer_loss_samples=0`` (activation statistics only);
   - the same with ``importance.layer_loss_samples=K importance.block_sizes=[...]`` (the
     command's default behaviour, with the layer-removal pass).

   The demo corpus is tokenised once by an untimed warm-up ``evaluate`` (cache in
   ``WORK_DIR/importance/data``), so the timed runs only read it.

Prints a table and the ratios, then one JSON line with every figure.  Exits non-zero if a
measured subprocess fails (its stderr tail is printed).  Timings on a shared machine are noisy:
the 1-min load average is printed before and after.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_import_hf as bih  # noqa: E402  (the sibling benchmark: model writer, cached import)
import harness  # noqa: E402
from bench_train import ARCH_FLAGS, HF_NAMES, add_arch_args, make_arch  # noqa: E402  (same Llama arch)
from bench_train import make_batches as random_batches  # noqa: E402  (the same tokens)
from harness import Clock, median_of  # noqa: E402

SEED = 1234


def parse_args(argv: list[str] | None = None):
    p = harness.parser(__doc__)
    add_arch_args(p, dict(zip(ARCH_FLAGS, (8, 512, 1536, 8, 4, 8192))))
    p.add_argument("--num-samples", type=int, default=64, help="calibration samples N")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample S")
    p.add_argument("--micro-batch", type=int, default=4, help="samples per micro-batch B")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    p.add_argument(
        "--layer-loss-samples",
        type=int,
        default=16,
        help="samples for the layer-removal LM-loss pass (c) and the CLI run with it; 0 = skip",
    )
    p.add_argument("--block-sizes", default="1", help="comma list of removed block sizes (c)")
    p.add_argument("--no-cli", action="store_true", help="skip the end-to-end CLI comparison")
    p.add_argument("--cli-repeats", type=int, default=None, help="default: --repeats")
    p.add_argument("--work-dir", default="/tmp/minitron_bench", help="model cache and outputs")
    args = p.parse_args(argv)
    args.blocks = [int(x) for x in harness.csv(args.block_sizes)]
    args.cli_repeats = args.cli_repeats or args.repeats
    if args.repeats < 1 or args.cli_repeats < 1:
        p.error("--repeats and --cli-repeats must be at least 1")
    if args.num_samples % args.micro_batch or args.layer_loss_samples % args.micro_batch:
        p.error("--num-samples and --layer-loss-samples must be multiples of --micro-batch")
    if not 0 <= args.layer_loss_samples <= args.num_samples:
        p.error("--layer-loss-samples must be between 0 and --num-samples")
    if any(not 1 <= n < args.num_layers for n in args.blocks):
        p.error("--block-sizes entries must be in 1..num_layers-1")
    return args


def make_batches(args) -> list[list[dict]]:
    """N random-token samples as one-micro-batch global batches (the command's layout on one
    rank: ``GlobalBatches(ds, micro_batch * dp, micro_batch, ...)``)."""
    b, s = args.micro_batch, args.seq_len
    mb = {
        "position_ids": torch.arange(s, dtype=torch.long).expand(b, s).contiguous(),
        "loss_mask": torch.ones(b, s, dtype=torch.float),
    }
    return [
        [dict(mb, tokens=x[:, :-1].contiguous(), labels=x[:, 1:].contiguous())]
        for x in random_batches(args, args.num_samples // b)
    ]


# ---------------------------------------------------------------------------- in-process


def run_in_process(args) -> dict:
    from minitron_mcore.utils.log import quiet_known_warnings

    quiet_known_warnings()  # Megatron's import-time notes about missing GPU accelerators
    from minitron_mcore.importance.command import _layer_losses, _layer_tensors, _reduce_and_gather
    from minitron_mcore.importance.hooks import ActivationCollector
    from minitron_mcore.models.build import build_model_for_stage
    from minitron_mcore.parallel import ParallelConfig, parallel_context
    from minitron_mcore.train.loop import evaluate
    from minitron_mcore.train.step import lm_forward_step

    arch = make_arch(args)
    batches = make_batches(args)
    ll_batches = batches[: args.layer_loss_samples // args.micro_batch]
    seq, L = args.seq_len, arch.num_layers
    passes = 1 + sum(L - n + 1 for n in args.blocks)
    with parallel_context(ParallelConfig(), SEED):
        clock = Clock()
        model = build_model_for_stage(arch, torch.float32, use_te=False)
        build_s = clock.wall()
        params = sum(p.numel() for p in model.parameters())
        fwd = lm_forward_step(arch.vocab_size)

        def plain(bs=batches):
            clock = Clock()
            loss = evaluate(model, fwd, bs, seq)
            return {"total_s": clock.wall(), "cpu_s": clock.cpu(), "loss": loss}

        def hooked():
            clock = Clock()
            collector = ActivationCollector(model)
            collector.attach()
            loss = evaluate(model, fwd, batches, seq)
            collector.detach()
            t1 = clock.wall()
            local = _reduce_and_gather(collector)
            t2 = clock.wall()
            tensors = _layer_tensors(local, collector, L)
            t3, c3 = clock.wall(), clock.cpu()
            return {
                "total_s": t3,
                "cpu_s": c3,
                "forward_s": t1,
                "reduce_gather_s": t2 - t1,
                "layer_tensors_s": t3 - t2,
                "loss": loss,
                "num_tensors": len(tensors),
            }

        def paired():
            """Plain and hooked passes one micro-batch at a time, alternating which goes
            first: both sides see the same machine load (robust on a shared machine)."""
            collector = ActivationCollector(model)
            t = {False: 0.0, True: 0.0}
            c = {False: 0.0, True: 0.0}
            ratios = []
            for k, b in enumerate(batches):
                dt = {}
                for hook in (False, True) if k % 2 == 0 else (True, False):
                    if hook:
                        collector.attach()
                    clock = Clock()
                    evaluate(model, fwd, [b], seq)
                    dt[hook] = clock.wall()
                    c[hook] += clock.cpu()
                    if hook:
                        collector.detach()
                    t[hook] += dt[hook]
                ratios.append(dt[True] / dt[False])
            clock = Clock()
            _layer_tensors(_reduce_and_gather(collector), collector, L)
            finalise, finalise_cpu = clock.wall(), clock.cpu()
            return {
                "plain_s": t[False],
                "hooked_s": t[True] + finalise,
                "ratio": (t[True] + finalise) / t[False],
                "cpu_ratio": (c[True] + finalise_cpu) / c[False],
                "batch_ratios": ratios,
            }

        def layer_loss(cache_gb: float):
            clock = Clock()
            out, _ = _layer_losses(model, fwd, ll_batches, seq, arch, args.blocks, None, cache_gb)
            return {
                "total_s": clock.wall(),
                "cpu_s": clock.cpu(),
                "base_loss": float(out["base_loss"]),
            }

        print("warm-up ...", flush=True)
        plain()
        hooked()
        runs = {k: [] for k in ("plain", "importance", "paired", "plain_ll", "layer_loss")}
        runs["layer_loss_full"] = []
        for r in range(args.repeats):
            print(f"[{r + 1}/{args.repeats}] plain, importance, paired ...", flush=True)
            runs["plain"].append(plain())
            runs["importance"].append(hooked())
            runs["paired"].append(paired())
            if ll_batches:
                print(f"[{r + 1}/{args.repeats}] layer loss ({passes} passes) ...", flush=True)
                runs["plain_ll"].append(plain(ll_batches))
                runs["layer_loss"].append(layer_loss(64.0))  # from cached layer inputs
                runs["layer_loss_full"].append(layer_loss(0.0))  # full passes
    return {
        "arch": arch.to_dict(),
        "params": params,
        "build_s": build_s,
        "passes": passes,
        "runs": {k: v for k, v in runs.items() if v},
    }


# ---------------------------------------------------------------------------- end to end (CLI)


def hf_spec(args) -> dict:
    """The HF config of the same shapes, untied (the rest: ``bench_import_hf``'s Llama)."""
    shapes = {hf: getattr(args, flag) for hf, flag in zip(HF_NAMES, ARCH_FLAGS)}
    return dict(bih.LLAMA_1B, **shapes, tie_word_embeddings=False)


def ensure_checkpoint(work: str, hf_dir: str, spec: dict, time_file: str) -> str:
    """``minitron import-hf load=hf_dir dtype=fp32``, cached next to the HF model."""
    return bih.cached_import(hf_dir, hf_dir + "-fp32-ckpt", spec, time_file, ["dtype=fp32"])[0]


def cli_commands(args, ckpt: str, work: str) -> dict[str, list[str]]:
    n, s, b = args.num_samples, args.seq_len, args.micro_batch
    base = [sys.executable, "-m", "minitron_mcore"]
    data = [f"data.cache_dir={os.path.join(work, 'data')}"]
    evaluate = base + ["evaluate", f"load={ckpt}", f"save={os.path.join(work, 'eval')}"]
    evaluate += data + ["data.valid=[demo:stdlib-code]", f"seq_length={s}"]
    evaluate += [f"global_batch_size={b}", f"micro_batch_size={b}", f"iters={n // b}"]
    evaluate += ["precision=fp32"]

    def importance(name: str, ll: int) -> list[str]:
        cmd = base + ["importance", f"load={ckpt}", f"save={os.path.join(work, name)}"]
        cmd += data + ["data.train=[demo:stdlib-code]", "overwrite=true"]
        cmd += [f"importance.num_samples={n}", f"importance.seq_length={s}"]
        cmd += [f"importance.micro_batch_size={b}", f"importance.layer_loss_samples={ll}"]
        cmd += ["importance.block_sizes=[" + ",".join(map(str, args.blocks)) + "]"]
        return cmd

    cmds = {"evaluate": evaluate, "importance": importance("scores", 0)}
    if args.layer_loss_samples:
        cmds["importance_ll"] = importance("scores-ll", args.layer_loss_samples)
    return cmds


CLI_LABELS = {
    "evaluate": "minitron evaluate",
    "importance": "minitron importance (no layer loss)",
    "importance_ll": "minitron importance (+layer loss)",
}


def run_cli(args) -> dict:
    work = os.path.join(os.path.abspath(args.work_dir), "importance")
    os.makedirs(work, exist_ok=True)
    time_file = os.path.join(work, "time-v.txt")
    spec = hf_spec(args)
    hf_dir = bih.ensure_hf_model(work, spec)
    ckpt = ensure_checkpoint(work, hf_dir, spec, time_file)
    cmds = cli_commands(args, ckpt, work)
    print("warm-up evaluate (tokenises the demo corpus once) ...", flush=True)
    warm = harness.measure_ok("warm-up", cmds["evaluate"], time_file)
    runs: dict[str, list] = {k: [] for k in cmds}
    for r in range(args.cli_repeats):
        for key, cmd in cmds.items():
            print(f"[{r + 1}/{args.cli_repeats}] {CLI_LABELS[key]} ...", flush=True)
            runs[key].append(harness.measure_ok(CLI_LABELS[key], cmd, time_file))
    return {
        "ckpt": ckpt,
        "warmup_wall_s": warm.wall_s,
        "commands": {k: " ".join(v[2:]) for k, v in cmds.items()},
        "runs": runs,
    }


# ---------------------------------------------------------------------------- reporting


def report_in_process(args, inproc: dict) -> dict:
    """Print the in-process figures; returns them for the JSON line."""
    runs = inproc["runs"]
    keys = ("total_s", "forward_s", "cpu_s", "reduce_gather_s", "layer_tensors_s")
    imp = {k: median_of(runs["importance"], k) for k in keys}
    plain_s, imp_s = median_of(runs["plain"], "total_s"), imp["total_s"]
    tokens = args.num_samples * args.seq_len
    print(
        f"\nmodel: {inproc['params'] / 1e6:.2f}M params (fp32), "
        f"{args.num_samples} samples x {args.seq_len} tokens, micro-batch {args.micro_batch}, "
        f"torch threads {torch.get_num_threads()}"
    )
    rows = [
        ("(a) plain forward (evaluate)", plain_s),
        ("(b) importance, total", imp_s),
        ("    forward with hooks", imp["forward_s"]),
        ("    _reduce_and_gather", imp["reduce_gather_s"]),
        ("    _layer_tensors", imp["layer_tensors_s"]),
    ]
    rows = [dict(name=name, s=s, x=s / plain_s) for name, s in rows]
    titles = dict(name=f"in-process (medians of {args.repeats})", s="s", x="x plain")
    print("\n" + harness.fixed_table("{name:<44}{s:>9.3f}{x:>9.3f}", titles, rows))
    print(f"plain forward throughput: {tokens / plain_s:,.0f} tokens/s")
    result = {
        "plain_s": plain_s,
        "importance_s": imp_s,
        "importance_forward_s": imp["forward_s"],
        "reduce_gather_s": imp["reduce_gather_s"],
        "layer_tensors_s": imp["layer_tensors_s"],
        "overhead_ratio": imp_s / plain_s,
        "plain_tokens_per_s": tokens / plain_s,
        "loss_plain": runs["plain"][0]["loss"],
        "loss_hooked": runs["importance"][0]["loss"],
    }
    result["cpu_overhead_ratio"] = imp["cpu_s"] / median_of(runs["plain"], "cpu_s")
    print(
        f"overhead ratio (b)/(a): {result['overhead_ratio']:.3f} wall time, "
        f"{result['cpu_overhead_ratio']:.3f} process CPU time"
    )
    result.update(report_paired(runs["paired"]))
    if "layer_loss" in runs:
        result.update(report_layer_loss(args, runs, inproc["passes"]))
    return result


def report_paired(pr: list[dict]) -> dict:
    batch_ratios = [x for r in pr for x in r["batch_ratios"]]
    result = dict(
        paired_plain_s=median_of(pr, "plain_s"),
        paired_importance_s=median_of(pr, "hooked_s"),
        paired_overhead_ratio=median_of(pr, "ratio"),
        paired_cpu_overhead_ratio=median_of(pr, "cpu_ratio"),
        paired_batch_ratio_median=statistics.median(batch_ratios),
    )
    print(
        f"paired (plain/hooked alternating per micro-batch): overhead ratio "
        f"{result['paired_overhead_ratio']:.3f} wall, {result['paired_cpu_overhead_ratio']:.3f} "
        f"CPU (medians over repeats); per-micro-batch wall median "
        f"{result['paired_batch_ratio_median']:.3f} over {len(batch_ratios)} pairs"
    )
    return result


def report_layer_loss(args, runs: dict, passes: int) -> dict:
    ll_plain, ll = median_of(runs["plain_ll"], "total_s"), median_of(runs["layer_loss"], "total_s")
    mult = ll / ll_plain
    cpu_mult = median_of(runs["layer_loss"], "cpu_s") / median_of(runs["plain_ll"], "cpu_s")
    print(
        f"(c) layer-removal loss, blocks {args.blocks}, {args.layer_loss_samples} samples: "
        f"{ll:.3f} s = {mult:.2f} x one plain pass over them ({ll_plain:.3f} s); "
        f"{passes} passes -> {mult / passes:.3f} x plain per pass "
        f"(process CPU time: {cpu_mult:.2f} x, {cpu_mult / passes:.3f} per pass)"
    )
    full = median_of(runs["layer_loss_full"], "total_s")
    print(
        f"    the same as full passes (importance.layer_cache_gb=0): {full:.3f} s = "
        f"{full / ll_plain:.2f} x plain; cached / full = {ll / full:.3f}"
    )
    return dict(
        layer_loss_full_s=full,
        layer_loss_cached_over_full=ll / full,
        layer_loss_s=ll,
        layer_loss_plain_s=ll_plain,
        layer_loss_multiple=mult,
        layer_loss_passes=passes,
        layer_loss_per_pass=mult / passes,
        layer_loss_cpu_multiple=cpu_mult,
    )


def report_cli(args, cli: dict) -> dict:
    """Print the end-to-end figures; returns them for the JSON line."""
    cr = cli["runs"]
    wall = {k: median_of(rs, "wall_s") for k, rs in cr.items()}
    inner = {k: median_of(rs, "inner_s") for k, rs in cr.items()}
    rows = []
    for k, rs in cr.items():
        txt = f"{inner[k]:.2f}" if inner[k] is not None else "-"
        rss = median_of(rs, "peak_rss_bytes") / harness.GIB
        rows.append(dict(label=CLI_LABELS[k], wall=wall[k], inner=txt, rss=rss))
    titles = dict(label=f"end to end (medians of {args.cli_repeats})", wall="wall s")
    titles.update(inner="in-proc s", rss="peak RSS GiB")
    print(
        "\n" + harness.fixed_table("{label:<40}{wall:>9.2f}{inner:>11}{rss:>14.2f}", titles, rows)
    )
    ev_w, ev_i = wall["evaluate"], inner["evaluate"]
    cli_res = {"ckpt": cli["ckpt"], "commands": cli["commands"]}
    for key, rs in cr.items():
        cli_res[key] = harness.summary(rs)
        if key != "evaluate":
            w, i = wall[key], inner[key]
            cli_res[f"{key}_over_evaluate_wall"] = w / ev_w
            cli_res[f"{key}_over_evaluate_inner"] = i / ev_i if i and ev_i else None
            inner_ratio = f"{i / ev_i:.2f}" if i and ev_i else "-"
            print(f"  {CLI_LABELS[key]} / evaluate: wall {w / ev_w:.2f}, in-process {inner_ratio}")
    print("wall s: whole process; in-proc s: the command's own `seconds` (imports excluded)")
    return cli_res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = harness.load_before()
    cli = None if args.no_cli else run_cli(args)
    inproc = run_in_process(args)
    result = report_in_process(args, inproc)
    if cli is not None:
        result["cli"] = report_cli(args, cli)
    load_after = harness.load_after(load_before)
    out = {
        "benchmark": "importance",
        **harness.host_info(load_before, load_after),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params": inproc["params"],
        "arch": {k: inproc["arch"][k] for k in ("num_layers", "hidden_size", "ffn_hidden_size")},
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "repeats": args.repeats,
        "block_sizes": args.blocks,
        "layer_loss_samples": args.layer_loss_samples,
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()},
        "in_process_runs": inproc["runs"],
    }
    print(json.dumps(out, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
