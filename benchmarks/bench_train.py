"""Benchmark: training tokens/s and CPU MFU of our Megatron-Core step vs a ``transformers`` loop.

Run from the repository root, in the project's virtualenv::

    python benchmarks/bench_train.py [--steps 5] [--warmup 2] [--seq-len 256] [--micro-batch 8] \
        [--precision fp32,bf16] [--threads N]

Leave ``OMP_NUM_THREADS`` alone: torch's default thread count is used and printed (``--threads``
sets it explicitly).  On a machine shared with other work, wall-clock figures swing with the
other processes; each step's process CPU time is recorded too (tokens per CPU-second), which
stays comparable between runs as long as the run is single-threaded (``--threads 1``: with
several threads, OpenMP workers spinning while they wait for a core count as CPU time).

What it does, all in one process:

1. Peak: the best of a few timed runs of square ``torch.mm`` (sizes 1024 and 2048) per precision,
   as achievable matmul FLOP/s (2·n³ per product) on this machine, measured in this run.
2. Baseline, for each precision: ``transformers`` ``LlamaForCausalLM`` (its default SDPA
   attention) with a plain loop — forward with ``labels``, ``backward``,
   ``torch.nn.utils.clip_grad_norm_``, ``torch.optim.AdamW`` step, ``zero_grad``.  fp32 is plain
   fp32; bf16 is fp32 parameters under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
3. Ours, for each precision: ``build_model_for_stage`` (Megatron ``GPTModel``, local spec) +
   Megatron DDP + Megatron optimizer + ``OptimizerParamScheduler``, one step =
   ``minitron_mcore.train.step.train_step`` on one micro-batch (global batch = micro-batch).
   fp32 is plain fp32; bf16 is Megatron mixed precision (bf16 parameters, fp32 gradient buffers
   and fp32 main parameters in the optimizer).  A failure of one precision is reported in the
   table and the JSON instead of stopping the run.
   The baseline runs first: the CPU compat layer (a ``TorchFunctionMode`` that sees every torch
   call) stays active once our side has started, and must not slow the baseline down.

Both sides use the same Llama-shaped model (hidden 384, FFN 1024, 8 layers, 6 heads, 3 KV groups,
vocab 8192, untied embeddings: 19.27M parameters), the same random tokens (fixed seed, a fresh
batch per step) and the same optimizer settings (lr 3e-4 constant, betas 0.9/0.95, eps 1e-8,
weight decay 0.1 on matrices only, clip 1.0).  Each side does ``--warmup`` untimed steps, then
``--steps`` timed ones; tokens/s = micro-batch · seq-len / median step time (robust to other
work on the machine; the mean-based figure is in the JSON too).  How busy the machine is (CPU
share used by other processes, load average) is printed before and after, with a warning:
figures taken while other processes compete for the cores are not comparable.

MFU = model FLOP/s / measured matmul peak of the same precision, with the PaLM convention
(forward + backward = 3 × forward, no recomputation, causal masking not discounted)::

    FLOPs/token = 6 · N_matmul + 12 · L · h · s

where ``N_matmul`` = all parameters − the input embedding (a lookup) = the layers' weights + the
LM head (norm weights included; they are 0.03% of it), ``L`` layers, ``h`` hidden, ``s`` sequence
length (the ``QKᵀ`` and ``AV`` products).  The HF loss covers s − 1 positions per sample (it
shifts the labels) but both sides compute all s positions, so both count b · s tokens per step.

Prints a table, the ratio ours / transformers of tokens/s per precision, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import traceback

import torch

LR = 3e-4
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
CLIP = 1.0
SEED = 1234
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8, help="= global batch (no accumulation)")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--ffn-hidden-size", type=int, default=1024)
    p.add_argument("--num-heads", type=int, default=6)
    p.add_argument("--num-kv-heads", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own choice)"
    )
    args = p.parse_args(argv)
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    bad = [x for x in args.precisions if x not in DTYPES]
    if bad or not args.precisions:
        p.error(f"--precision: unknown {bad}; use a comma list of {sorted(DTYPES)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def make_arch(args):
    from minitron_mcore.models.arch import ModelArch

    return ModelArch(
        family="llama",
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_heads,
        num_query_groups=args.num_kv_heads,
        vocab_size=args.vocab_size,
        max_position_embeddings=max(2048, args.seq_len),
    )


def flops_per_token(arch, seq_len: int) -> tuple[int, int]:
    """(FLOPs per trained token, N_matmul) - see the module docstring."""
    n_matmul = arch.num_params() - arch.vocab_size * arch.hidden_size
    attn = 12 * arch.num_layers * arch.hidden_size * seq_len
    return 6 * n_matmul + attn, n_matmul


def make_batches(args, n: int) -> list[torch.Tensor]:
    """``n`` random token batches [b, s + 1] (inputs are [:, :-1], next tokens [:, 1:])."""
    g = torch.Generator().manual_seed(SEED)
    return [
        torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g)
        for _ in range(n)
    ]


# --------------------------------------------------------------------------------------- peak


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048), repeats: int = 5) -> dict:
    """Best achieved FLOP/s of square matmuls in ``dtype`` over ``sizes`` and ``repeats``."""
    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up (kernel selection, page faults)
        inner = max(1, int(4e9 // (2 * n**3)))  # about 4 GFLOP per timing
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=out)
            dt = time.perf_counter() - t0
            rate = inner * 2 * n**3 / dt
            if rate > best:
                best, best_n = rate, n
    return {"flops": best, "size": best_n}


# ----------------------------------------------------------------------------------- baseline


def run_transformers(args, arch, precision: str, batches) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rotary_base,
        rms_norm_eps=arch.norm_epsilon,
        initializer_range=arch.init_std,
        tie_word_embeddings=arch.tie_embeddings,
        attention_dropout=0.0,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).float()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )

    def step(batch):
        tokens = batch[:, :-1].contiguous()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return timed_loop(args, step, batches, n_params=n_params)


# ---------------------------------------------------------------------------------------- ours


def run_ours(args, arch, precision: str, batches) -> dict:
    from minitron_mcore.models.build import build_model_for_stage
    from minitron_mcore.parallel import set_seed
    from minitron_mcore.train.config import TrainConfig
    from minitron_mcore.train.optim import (
        attach_to_config,
        build_optimizer,
        build_scheduler,
        wrap_ddp,
    )
    from minitron_mcore.train.step import lm_forward_step, train_step

    set_seed(SEED)
    model = build_model_for_stage(arch, DTYPES[precision], calculate_per_token_loss=True)
    n_params = sum(p.numel() for p in model.parameters())
    total_steps = args.warmup + args.steps
    train_cfg = TrainConfig(
        steps=total_steps,
        seq_length=args.seq_len,
        global_batch_size=args.micro_batch,
        micro_batch_size=args.micro_batch,
        lr=LR,
        min_lr=LR,
        warmup_steps=0,
        decay_style="constant",
        weight_decay=WEIGHT_DECAY,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        clip_grad=CLIP,
        distributed_optimizer="false",
        precision=precision,
    )
    ddp = wrap_ddp(model, model.config, distributed_optimizer=False)
    opt = build_optimizer(ddp, train_cfg, model.config, False)
    sched = build_scheduler(opt, train_cfg, total_steps)
    attach_to_config(model.config, ddp, opt)
    forward_step = lm_forward_step(arch.vocab_size)
    position_ids = torch.arange(args.seq_len).unsqueeze(0).expand(args.micro_batch, -1)
    loss_mask = torch.ones(args.micro_batch, args.seq_len)

    def step(batch):
        mb = {
            "tokens": batch[:, :-1].contiguous(),
            "labels": batch[:, 1:].contiguous(),
            "position_ids": position_ids.contiguous(),
            "loss_mask": loss_mask,
        }
        reports, _, _ = train_step(ddp, opt, sched, forward_step, [mb], args.seq_len)
        return reports["lm loss"]

    return timed_loop(args, step, batches, n_params=n_params)


# -------------------------------------------------------------------------------------- common


def timed_loop(args, step, batches, n_params: int) -> dict:
    losses = []
    for batch in batches[: args.warmup]:
        losses.append(step(batch))
    t0 = time.perf_counter()
    step_times, cpu_times = [], []
    for batch in batches[args.warmup : args.warmup + args.steps]:
        s0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(batch))
        step_times.append(time.perf_counter() - s0)
        cpu_times.append(time.process_time() - c0)
    elapsed = time.perf_counter() - t0
    tokens = args.micro_batch * args.seq_len
    median = statistics.median(step_times)
    cpu_median = statistics.median(cpu_times)
    return {
        "ok": True,
        "tokens_per_s": tokens / median,
        "tokens_per_s_mean": tokens * args.steps / elapsed,
        "tokens_per_cpu_s": tokens / cpu_median,
        "cpu_s_median": cpu_median,
        "step_s_median": median,
        "step_s_min": min(step_times),
        "step_s_max": max(step_times),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "params_built": n_params,
    }


def guarded(fn, *a) -> dict:
    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001 - a failed precision is reported, not fatal
        tb = traceback.format_exc()
        print(tb, flush=True)
        return {"ok": False, "error": f"{type(e).__name__}: {e}".strip()[:500]}


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs from /proc/stat; None where it does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def load_note(when: str) -> dict:
    """Print how busy the machine is while this process sleeps for a second (i.e. the share of
    the CPUs other processes use) and the load average; warn when others compete for the cores.
    The 1-minute load average lags by about a minute, so the sampled share decides the warning."""
    load = list(os.getloadavg())
    a = _cpu_times()
    time.sleep(1.0)
    b = _cpu_times()
    others = None
    if a and b and b[1] > a[1]:
        others = (b[0] - a[0]) / (b[1] - a[1])
    busy = others > 0.1 if others is not None else load[0] > torch.get_num_threads() + 0.5
    warn = "  WARNING: other processes compete for the cores; figures not comparable"
    warn = warn if busy else ""
    share = f"{others:.0%}" if others is not None else "n/a"
    print(
        f"machine {when}: CPU used by others {share}, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}{warn}",
        flush=True,
    )
    return {"others_cpu_share": others, "loadavg": load, "contended": busy}


def fmt_rate(x: float) -> str:
    return f"{x / 1e9:8.1f} GFLOP/s"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    arch = make_arch(args)
    fpt, n_matmul = flops_per_token(arch, args.seq_len)
    n_total = arch.num_params()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}",
        flush=True,
    )
    print(
        f"model: llama L={arch.num_layers} h={arch.hidden_size} ffn={arch.ffn_hidden_size} "
        f"heads={arch.num_attention_heads} kv={arch.num_query_groups} vocab={arch.vocab_size}: "
        f"{n_total:,} params ({n_matmul:,} excluding the input embedding)",
        flush=True,
    )
    print(
        f"batch {args.micro_batch} x {args.seq_len} tokens, warmup {args.warmup}, "
        f"timed {args.steps} steps; FLOPs/token = 6*{n_matmul:,} + 12*{arch.num_layers}"
        f"*{arch.hidden_size}*{args.seq_len} = {fpt:,}",
        flush=True,
    )

    load_before = load_note("before")
    peaks = {}
    for prec in args.precisions:
        peaks[prec] = matmul_peak(DTYPES[prec])
        print(
            f"peak {prec}: {fmt_rate(peaks[prec]['flops'])} ({peaks[prec]['size']}^2 mm)",
            flush=True,
        )

    batches = make_batches(args, args.warmup + args.steps)
    results: dict[str, dict[str, dict]] = {"transformers": {}, "ours": {}}
    # The baseline first: see the module docstring (compat layer stays active afterwards).
    for prec in args.precisions:
        print(f"transformers {prec} ...", flush=True)
        results["transformers"][prec] = guarded(run_transformers, args, arch, prec, batches)

    from minitron_mcore.parallel import ParallelConfig, parallel_context

    with parallel_context(ParallelConfig(), SEED):
        for prec in args.precisions:
            print(f"ours {prec} ...", flush=True)
            results["ours"][prec] = guarded(run_ours, args, arch, prec, batches)

    load_after = load_note("after")
    for side in results.values():
        for prec, r in side.items():
            if r["ok"]:
                r["model_flops_per_s"] = r["tokens_per_s"] * fpt
                r["mfu"] = r["model_flops_per_s"] / peaks[prec]["flops"]

    print()
    header = (
        f"{'side':<13}{'prec':<6}{'tokens/s':>10}{'s/step':>9}{'GFLOP/s':>9}{'MFU':>8}"
        f"{'tok/CPU-s':>10}{'loss first->last':>20}"
    )
    print(header)
    print("-" * len(header))
    for name, side in results.items():
        for prec, r in side.items():
            if not r["ok"]:
                print(f"{name:<13}{prec:<6}  FAILED: {r['error']}")
                continue
            print(
                f"{name:<13}{prec:<6}{r['tokens_per_s']:>10.0f}{r['step_s_median']:>9.2f}"
                f"{r['model_flops_per_s'] / 1e9:>9.1f}{r['mfu']:>8.1%}"
                f"{r['tokens_per_cpu_s']:>10.0f}{r['loss_first']:>11.3f} ->{r['loss_last']:>6.3f}"
            )
    print()
    ratios, cpu_ratios = {}, {}
    for prec in args.precisions:
        a, b = results["ours"][prec], results["transformers"][prec]
        if a["ok"] and b["ok"]:
            ratios[prec] = a["tokens_per_s"] / b["tokens_per_s"]
            cpu_ratios[prec] = a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"]
            print(
                f"ours / transformers tokens/s, {prec}: {ratios[prec]:.2f}x "
                f"(per CPU-second: {cpu_ratios[prec]:.2f}x)"
            )
        else:
            ratios[prec] = cpu_ratios[prec] = None
            print(f"ours / transformers tokens/s, {prec}: n/a (a run failed)")
    print(
        json.dumps(
            {
                "bench": "train",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine_before": load_before,
                "machine_after": load_after,
                "model": {
                    "num_layers": arch.num_layers,
                    "hidden_size": arch.hidden_size,
                    "ffn_hidden_size": arch.ffn_hidden_size,
                    "num_attention_heads": arch.num_attention_heads,
                    "num_query_groups": arch.num_query_groups,
                    "vocab_size": arch.vocab_size,
                    "params": n_total,
                    "params_matmul": n_matmul,
                },
                "seq_len": args.seq_len,
                "micro_batch": args.micro_batch,
                "warmup": args.warmup,
                "steps": args.steps,
                "flops_per_token": fpt,
                "peak_flops": {k: v["flops"] for k, v in peaks.items()},
                "results": results,
                "ratio_tokens_per_s": ratios,
                "ratio_tokens_per_cpu_s": cpu_ratios,
            }
        )
    )
    failed = any(not r["ok"] for side in results.values() for r in side.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
