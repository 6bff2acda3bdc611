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

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_import_hf as bih  # noqa: E402  (the sibling benchmark: model writer, measure())
from bench_train import make_arch  # noqa: E402  (same Llama-shaped ModelArch from the flags)

SEED = 1234


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--ffn-hidden-size", type=int, default=1536)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192)
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
    args.blocks = [int(x) for x in args.block_sizes.split(",") if x.strip()]
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
    g = torch.Generator().manual_seed(SEED)
    b, s = args.micro_batch, args.seq_len
    out = []
    for _ in range(args.num_samples // b):
        x = torch.randint(0, args.vocab_size, (b, s + 1), generator=g)
        mb = {
            "tokens": x[:, :-1].contiguous(),
            "labels": x[:, 1:].contiguous(),
            "position_ids": torch.arange(s, dtype=torch.long).expand(b, s).contiguous(),
            "loss_mask": torch.ones(b, s, dtype=torch.float),
        }
        out.append([mb])
    return out


def now() -> float:
    return time.perf_counter()


def cpu() -> float:
    """CPU seconds of this process, all threads: less sensitive than wall time to other
    processes competing for the cores (both sides use the same torch thread count)."""
    return time.process_time()


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
        t0 = now()
        model = build_model_for_stage(arch, torch.float32, use_te=False)
        build_s = now() - t0
        params = sum(p.numel() for p in model.parameters())
        fwd = lm_forward_step(arch.vocab_size)

        def plain(bs=batches):
            t0, c0 = now(), cpu()
            loss = evaluate(model, fwd, bs, seq)
            return {"total_s": now() - t0, "cpu_s": cpu() - c0, "loss": loss}

        def hooked():
            t0, c0 = now(), cpu()
            collector = ActivationCollector(model)
            collector.attach()
            loss = evaluate(model, fwd, batches, seq)
            collector.detach()
            t1 = now()
            local = _reduce_and_gather(collector)
            t2 = now()
            tensors = _layer_tensors(local, collector, L)
            t3, c3 = now(), cpu()
            return {
                "total_s": t3 - t0,
                "cpu_s": c3 - c0,
                "forward_s": t1 - t0,
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
                    t0, c0 = now(), cpu()
                    evaluate(model, fwd, [b], seq)
                    dt[hook] = now() - t0
                    c[hook] += cpu() - c0
                    if hook:
                        collector.detach()
                    t[hook] += dt[hook]
                ratios.append(dt[True] / dt[False])
            t0, c0 = now(), cpu()
            _layer_tensors(_reduce_and_gather(collector), collector, L)
            finalise, finalise_cpu = now() - t0, cpu() - c0
            return {
                "plain_s": t[False],
                "hooked_s": t[True] + finalise,
                "ratio": (t[True] + finalise) / t[False],
                "cpu_ratio": (c[True] + finalise_cpu) / c[False],
                "batch_ratios": ratios,
            }

        def layer_loss(cache_gb: float):
            t0, c0 = now(), cpu()
            out, _ = _layer_losses(model, fwd, ll_batches, seq, arch, args.blocks, None, cache_gb)
            return {
                "total_s": now() - t0,
                "cpu_s": cpu() - c0,
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


def med(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


# ---------------------------------------------------------------------------- end to end (CLI)


def hf_spec(args) -> dict:
    return dict(
        bih.LLAMA_1B,
        hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        vocab_size=args.vocab_size,
        tie_word_embeddings=False,
    )


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
    warm = bih.measure("warm-up", cmds["evaluate"], time_file)
    if warm.returncode != 0:
        bih.fail(warm, cmds["evaluate"])
    runs: dict[str, list] = {k: [] for k in cmds}
    for r in range(args.cli_repeats):
        for key, cmd in cmds.items():
            print(f"[{r + 1}/{args.cli_repeats}] {CLI_LABELS[key]} ...", flush=True)
            run = bih.measure(CLI_LABELS[key], cmd, time_file)
            if run.returncode != 0:
                bih.fail(run, cmd)
            runs[key].append(run)
    return {
        "ckpt": ckpt,
        "warmup_wall_s": warm.wall_s,
        "commands": {k: " ".join(v[2:]) for k, v in cmds.items()},
        "runs": runs,
    }


# ---------------------------------------------------------------------------- reporting


def report(args, inproc: dict, cli: dict | None, load_before: float) -> dict:
    runs = inproc["runs"]
    plain_s, imp_s = med(runs["plain"], "total_s"), med(runs["importance"], "total_s")
    tokens = args.num_samples * args.seq_len
    print(
        f"\nmodel: {inproc['params'] / 1e6:.2f}M params (fp32), "
        f"{args.num_samples} samples x {args.seq_len} tokens, micro-batch {args.micro_batch}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"\n{'in-process (medians of ' + str(args.repeats) + ')':<44}{'s':>9}{'x plain':>9}")
    rows = [
        ("(a) plain forward (evaluate)", plain_s),
        ("(b) importance, total", imp_s),
        ("    forward with hooks", med(runs["importance"], "forward_s")),
        ("    _reduce_and_gather", med(runs["importance"], "reduce_gather_s")),
        ("    _layer_tensors", med(runs["importance"], "layer_tensors_s")),
    ]
    for name, s in rows:
        print(f"{name:<44}{s:>9.3f}{s / plain_s:>9.3f}")
    print(f"plain forward throughput: {tokens / plain_s:,.0f} tokens/s")
    result = {
        "plain_s": plain_s,
        "importance_s": imp_s,
        "importance_forward_s": med(runs["importance"], "forward_s"),
        "reduce_gather_s": med(runs["importance"], "reduce_gather_s"),
        "layer_tensors_s": med(runs["importance"], "layer_tensors_s"),
        "overhead_ratio": imp_s / plain_s,
        "plain_tokens_per_s": tokens / plain_s,
        "loss_plain": runs["plain"][0]["loss"],
        "loss_hooked": runs["importance"][0]["loss"],
    }
    result["cpu_overhead_ratio"] = med(runs["importance"], "cpu_s") / med(runs["plain"], "cpu_s")
    print(
        f"overhead ratio (b)/(a): {result['overhead_ratio']:.3f} wall time, "
        f"{result['cpu_overhead_ratio']:.3f} process CPU time"
    )
    pr = runs["paired"]
    batch_ratios = [x for r in pr for x in r["batch_ratios"]]
    result.update(
        paired_plain_s=med(pr, "plain_s"),
        paired_importance_s=med(pr, "hooked_s"),
        paired_overhead_ratio=med(pr, "ratio"),
        paired_cpu_overhead_ratio=med(pr, "cpu_ratio"),
        paired_batch_ratio_median=statistics.median(batch_ratios),
    )
    print(
        f"paired (plain/hooked alternating per micro-batch): overhead ratio "
        f"{result['paired_overhead_ratio']:.3f} wall, {result['paired_cpu_overhead_ratio']:.3f} "
        f"CPU (medians over repeats); per-micro-batch wall median "
        f"{result['paired_batch_ratio_median']:.3f} over {len(batch_ratios)} pairs"
    )
    if "layer_loss" in runs:
        ll_plain, ll = med(runs["plain_ll"], "total_s"), med(runs["layer_loss"], "total_s")
        mult = ll / ll_plain
        cpu_mult = med(runs["layer_loss"], "cpu_s") / med(runs["plain_ll"], "cpu_s")
        print(
            f"(c) layer-removal loss, blocks {args.blocks}, {args.layer_loss_samples} samples: "
            f"{ll:.3f} s = {mult:.2f} x one plain pass over them ({ll_plain:.3f} s); "
            f"{inproc['passes']} passes -> {mult / inproc['passes']:.3f} x plain per pass "
            f"(process CPU time: {cpu_mult:.2f} x, {cpu_mult / inproc['passes']:.3f} per pass)"
        )
        full = med(runs["layer_loss_full"], "total_s")
        print(
            f"    the same as full passes (importance.layer_cache_gb=0): {full:.3f} s = "
            f"{full / ll_plain:.2f} x plain; cached / full = {ll / full:.3f}"
        )
        result.update(
            layer_loss_full_s=full,
            layer_loss_cached_over_full=ll / full,
            layer_loss_s=ll,
            layer_loss_plain_s=ll_plain,
            layer_loss_multiple=mult,
            layer_loss_passes=inproc["passes"],
            layer_loss_per_pass=mult / inproc["passes"],
            layer_loss_cpu_multiple=cpu_mult,
        )
    if cli is not None:
        cr = cli["runs"]
        print(f"\n{'end to end (medians of ' + str(args.cli_repeats) + ')':<40}", end="")
        print(f"{'wall s':>9}{'in-proc s':>11}{'peak RSS GiB':>14}")
        for key, rs in cr.items():
            wall, inner = bih.median(rs, "wall_s"), bih.median(rs, "inner_s")
            rss = bih.median(rs, "peak_rss_bytes")
            inner_txt = f"{inner:.2f}" if inner is not None else "-"
            print(f"{CLI_LABELS[key]:<40}{wall:>9.2f}{inner_txt:>11}{rss / bih.GIB:>14.2f}")
        ev_w, ev_i = bih.median(cr["evaluate"], "wall_s"), bih.median(cr["evaluate"], "inner_s")
        cli_res = {"ckpt": cli["ckpt"], "commands": cli["commands"]}
        for key, rs in cr.items():
            cli_res[key] = bih.summary(rs)
            if key != "evaluate":
                w, i = bih.median(rs, "wall_s"), bih.median(rs, "inner_s")
                cli_res[f"{key}_over_evaluate_wall"] = w / ev_w
                cli_res[f"{key}_over_evaluate_inner"] = i / ev_i if i and ev_i else None
                inner_ratio = f"{i / ev_i:.2f}" if i and ev_i else "-"
                print(
                    f"  {CLI_LABELS[key]} / evaluate: wall {w / ev_w:.2f}, in-process {inner_ratio}"
                )
        print("wall s: whole process; in-proc s: the command's own `seconds` (imports excluded)")
        result["cli"] = cli_res
    load_after = os.getloadavg()[0]
    print(f"1-min load average: {load_before:.2f} before, {load_after:.2f} after")
    return {
        "benchmark": "importance",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(load_after, 2),
        "python": platform.python_version(),
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"note: 1-min load average is {load_before:.2f}; other work skews the timings")
    cli = None if args.no_cli else run_cli(args)
    inproc = run_in_process(args)
    print(json.dumps(report(args, inproc, cli, load_before), sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
