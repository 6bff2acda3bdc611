"""Benchmark: training tokens/s and MFU of our Megatron-Core step vs a ``transformers`` loop.

Run from the repository root, in the project's virtualenv::

    python benchmarks/bench_train.py [--steps 5] [--warmup 2] [--seq-len 256] [--micro-batch 8] \
        [--precision fp32,bf16] [--threads N]
    python benchmarks/bench_train.py --device cuda [--num-layers 4] [--seq-len 4096] \
        [--micro-batch 2] [--steps 10] [--warmup 3]

``--device cpu`` (the default) is described first; ``--device cuda`` at the end.

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

``--device cuda``: the same two loops on one GPU, bf16 only, with Llama-3.1-8B's shapes (hidden
4096, FFN 14336, 32 heads, 8 KV groups, vocab 128256, untied) but only ``--num-layers`` (default
4) of its 32 layers: 1.92B parameters, whose Megatron mixed-precision state (bf16 weights, fp32
gradients, fp32 main weights and two Adam moments: 18 bytes per parameter, 35 GB) leaves room
on an 80 GB GPU for the activations and logits of 2 x 4096 tokens on either side.

* transformers: ``LlamaForCausalLM`` built on the GPU with fp32 parameters, ``sdpa`` attention,
  each step under ``torch.autocast("cuda", dtype=torch.bfloat16)`` (the mixed precision of the
  HF Trainer's ``bf16=True``), fused ``torch.optim.AdamW``.
* ours: the engine as ``minitron pretrain`` sets it up on a GPU - ``build_model_for_stage`` with
  the keys of ``train/fast_paths.py`` (Transformer Engine spec when TE imports, gradient
  accumulation fusion where Apex's kernel is, recomputation from 8192-token samples),
  ``wrap_ddp``, the distributed optimizer (``train.distributed_optimizer=auto``), Megatron
  mixed precision (bf16 weights, fp32 main weights and gradients), ``train_step``.

Timed regions are bracketed by ``torch.cuda.synchronize()``. Peak memory is
``torch.cuda.max_memory_allocated()`` of each side, reset before it starts. MFU is against the
GPU's dense bf16 tensor-core peak (no 2:4 sparsity) from NVIDIA's datasheets, looked up by
``torch.cuda.get_device_name()`` (``GPU_BF16_PEAKS``); for a GPU not in the table, against the
best bf16 ``torch.mm`` rate measured in this run (which is printed for every GPU).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import guarded, load_note  # noqa: E402  (bench_distill.py imports them from here)

LR = 3e-4
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
CLIP = 1.0
SEED = 1234
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The model's shape: our flags, ModelArch's fields and the Hugging Face config's, in one order.
ARCH_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads")
ARCH_FLAGS += ("vocab_size",)
ARCH_NAMES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
ARCH_NAMES += ("num_query_groups", "vocab_size")
HF_NAMES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
HF_NAMES += ("num_key_value_heads", "vocab_size")


# Defaults per --device. cpu: a 19.27M-parameter Llama-shaped model. cuda: Llama-3.1-8B's
# shapes with 4 of its 32 layers (see the module docstring for why it fits).
_RUN = ("steps", "warmup", "seq_len", "micro_batch", "precision")
DEFAULTS = {
    "cpu": dict(zip(_RUN + ARCH_FLAGS, (5, 2, 256, 8, "fp32,bf16", 8, 384, 1024, 6, 3, 8192))),
    "cuda": dict(zip(_RUN + ARCH_FLAGS, (10, 3, 4096, 2, "bf16", 4, 4096, 14336, 32, 8, 128256))),
}


def _default(name: str) -> str:
    return f"(cpu {DEFAULTS['cpu'][name]}, cuda {DEFAULTS['cuda'][name]})"


def add_arch_args(p, defaults: dict | None = None, help=lambda flag: None) -> None:
    """``--num-layers`` ... ``--vocab-size`` (``ARCH_FLAGS``)."""
    for flag in ARCH_FLAGS:
        default = (defaults or {}).get(flag)
        p.add_argument("--" + flag.replace("_", "-"), type=int, default=default, help=help(flag))


def parse_args(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, help="timed steps per run " + _default("steps"))
    p.add_argument(
        "--warmup", type=int, help="untimed steps before the timed ones " + _default("warmup")
    )
    p.add_argument("--seq-len", type=int, help=_default("seq_len"))
    p.add_argument(
        "--micro-batch",
        type=int,
        help="= global batch (no accumulation) " + _default("micro_batch"),
    )
    p.add_argument("--precision", help="comma list of fp32, bf16 (cuda: bf16 only)")
    add_arch_args(p, help=_default)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own choice)"
    )
    args = p.parse_args(argv)
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.precisions = harness.csv(args.precision)
    bad = [x for x in args.precisions if x not in DTYPES]
    if bad or not args.precisions:
        p.error(f"--precision: unknown {bad}; use a comma list of {sorted(DTYPES)}")
    if args.device == "cuda" and args.precisions != ["bf16"]:
        p.error("--device cuda measures bf16 only (its MFU is against the dense bf16 peak)")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def llama_arch(shape, seq_len: int):
    """A Llama ``ModelArch`` of ``shape`` (values in ``ARCH_NAMES``' order)."""
    from minitron_mcore.models.arch import ModelArch

    fields = dict(zip(ARCH_NAMES, shape))
    return ModelArch(family="llama", **fields, max_position_embeddings=max(2048, seq_len))


def make_arch(args):
    return llama_arch([getattr(args, f) for f in ARCH_FLAGS], args.seq_len)


def train_config(steps: int, seq_len: int, batch: int, precision: str, **kw):
    """Our ``TrainConfig`` with the benchmarks' optimizer settings (constant LR, one
    micro-batch per step); ``kw``: any other field."""
    from minitron_mcore.train.config import TrainConfig

    return TrainConfig(
        steps=steps,
        seq_length=seq_len,
        global_batch_size=batch,
        micro_batch_size=batch,
        lr=LR,
        min_lr=LR,
        warmup_steps=0,
        decay_style="constant",
        weight_decay=WEIGHT_DECAY,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        clip_grad=CLIP,
        precision=precision,
        **kw,
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


def matmul_peak(
    dtype: torch.dtype,
    sizes=(1024, 2048),
    repeats: int = 5,
    device: str = "cpu",
    work: float = 4e9,
    sync=None,
) -> dict:
    """Best achieved FLOP/s of square matmuls in ``dtype`` over ``sizes`` and ``repeats``, each
    timing about ``work`` FLOPs; ``sync`` waits for the device (on a GPU)."""
    sync = sync or (lambda: None)
    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)  # [n, n]
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.empty(n, n, dtype=dtype, device=device)
        torch.mm(a, b, out=out)  # warm-up (kernel selection, page faults)
        inner = max(1, int(work // (2 * n**3)))
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=out)
            sync()
            dt = time.perf_counter() - t0
            rate = inner * 2 * n**3 / dt
            if rate > best:
                best, best_n = rate, n
    return {"flops": best, "size": best_n}


# ----------------------------------------------------------------------------------- baseline


def hf_model(arch, **config_kw):
    """``LlamaForCausalLM`` of ``arch``'s shape, initialised from ``SEED``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{hf: getattr(arch, name) for hf, name in zip(HF_NAMES, ARCH_NAMES)},
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rotary_base,
        rms_norm_eps=arch.norm_epsilon,
        initializer_range=arch.init_std,
        tie_word_embeddings=arch.tie_embeddings,
        attention_dropout=0.0,
        **config_kw,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).float()


def hf_adamw(model, **kw):
    """AdamW with our settings: weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        **kw,
    )


def hf_update(model, opt, loss) -> float:
    """The plain loop's update: backward, ``clip_grad_norm_``, optimizer step, ``zero_grad``."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def run_transformers(args, arch, precision: str, batches, device: str = "cpu") -> dict:
    """The plain loop; on a GPU: fp32 parameters made there, bf16 autocast, fused AdamW."""
    cuda = device == "cuda"
    with torch.device(device):
        model = hf_model(arch, **({"attn_implementation": "sdpa"} if cuda else {}))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = hf_adamw(model, **({"fused": True} if cuda else {}))

    def step(batch):
        tokens = batch[:, :-1].contiguous().to(device)  # [b, s]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=tokens, labels=tokens).loss
        return hf_update(model, opt, loss)

    sync = torch.cuda.synchronize if cuda else None
    return timed_loop(args, step, batches, n_params=n_params, sync=sync)


# ---------------------------------------------------------------------------------------- ours


def run_ours(args, arch, precision: str, batches, details: dict | None = None) -> dict:
    """Our step on this process's device, set up as the training stages set it up (``minitron
    pretrain`` and ``Trainer``); ``details`` (if given) receives what the engine chose."""
    from minitron_mcore.models.build import build_model_for_stage
    from minitron_mcore.parallel import ParallelConfig, set_seed, to_device
    from minitron_mcore.train import fast_paths
    from minitron_mcore.train.optim import (
        attach_to_config,
        build_optimizer,
        build_scheduler,
        use_distributed_optimizer,
        wrap_ddp,
    )
    from minitron_mcore.train.step import lm_forward_step, train_step

    total_steps = args.warmup + args.steps
    # every other key at its default (auto): the engine's choice for this device
    train_cfg = train_config(total_steps, args.seq_len, args.micro_batch, precision)
    set_seed(SEED)
    model_kw = fast_paths.model_kwargs(train_cfg, ParallelConfig())
    model = build_model_for_stage(arch, DTYPES[precision], **model_kw)
    n_params = sum(p.numel() for p in model.parameters())
    dist_opt = use_distributed_optimizer(train_cfg)  # off on the CPU, on on a GPU
    ddp = wrap_ddp(model, model.config, dist_opt, train_cfg)
    opt = build_optimizer(ddp, train_cfg, model.config, dist_opt)
    sched = build_scheduler(opt, train_cfg, total_steps)
    attach_to_config(model.config, ddp, opt)
    if details is not None:
        details.update(engine_details(model, model_kw, dist_opt))
    forward_step = lm_forward_step(arch.vocab_size)
    b, s = args.micro_batch, args.seq_len
    position_ids = to_device(torch.arange(s).unsqueeze(0).expand(b, -1).contiguous())  # [b, s]
    loss_mask = to_device(torch.ones(b, s))  # [b, s]

    def step(batch):  # batch: [b, s + 1] token ids on the host
        mb = to_device({"tokens": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()})
        mb.update(position_ids=position_ids, loss_mask=loss_mask)
        reports, _, _ = train_step(ddp, opt, sched, forward_step, [mb], s)
        return reports["lm loss"]

    sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    return timed_loop(args, step, batches, n_params=n_params, sync=sync)


def engine_details(model, model_kw: dict, dist_opt: bool) -> dict:
    """What the engine chose for this device: layer spec (by its core attention), precision,
    distributed optimizer and the fast-path TransformerConfig fields."""
    layer = model.decoder.layers[0]
    fast = {k: v for k, v in model_kw.items() if "dropout" not in k}
    return {
        "core_attention": type(layer.self_attention.core_attention).__name__,
        "params_dtype": str(model.config.params_dtype).replace("torch.", ""),
        "distributed_optimizer": dist_opt,
        "recompute_granularity": model.config.recompute_granularity,
        **fast,
    }


# -------------------------------------------------------------------------------------- common


def timed_loop(args, step, batches, n_params: int, sync=None) -> dict:
    """Warm-up, then timed steps (``harness.timed_steps``); tokens/s from the median step."""
    batches = batches[: args.warmup + args.steps]
    r = harness.timed_steps({"step": step}, batches, args.warmup, sync)["step"]
    tokens = args.micro_batch * args.seq_len
    median = statistics.median(r["step_s"])
    cpu_median = statistics.median(r["cpu_s"])
    return {
        "ok": True,
        "tokens_per_s": tokens / median,
        "tokens_per_s_mean": tokens * args.steps / sum(r["step_s"]),
        "tokens_per_cpu_s": tokens / cpu_median,
        "cpu_s_median": cpu_median,
        "step_s_median": median,
        "step_s_min": min(r["step_s"]),
        "step_s_max": max(r["step_s"]),
        "loss_first": r["losses"][0],
        "loss_last": r["losses"][-1],
        "params_built": n_params,
    }


def fmt_rate(x: float) -> str:
    return f"{x / 1e9:8.1f} GFLOP/s"


def print_model(args, arch, fpt: int, n_matmul: int) -> None:
    print(
        f"model: llama L={arch.num_layers} h={arch.hidden_size} ffn={arch.ffn_hidden_size} "
        f"heads={arch.num_attention_heads} kv={arch.num_query_groups} vocab={arch.vocab_size}: "
        f"{arch.num_params():,} params ({n_matmul:,} excluding the input embedding)",
        flush=True,
    )
    print(
        f"batch {args.micro_batch} x {args.seq_len} tokens, warmup {args.warmup}, "
        f"timed {args.steps} steps; FLOPs/token = 6*{n_matmul:,} + 12*{arch.num_layers}"
        f"*{arch.hidden_size}*{args.seq_len} = {fpt:,}",
        flush=True,
    )


def add_mfu(results: dict, fpt: int, peaks: dict) -> None:
    """Model FLOP/s and MFU of every run that finished (``peaks``: precision -> FLOP/s)."""
    for side in results.values():
        for prec, r in side.items():
            if r["ok"]:
                r["model_flops_per_s"] = r["tokens_per_s"] * fpt
                r["mfu"] = r["model_flops_per_s"] / peaks[prec]


def run_json(args, arch, n_matmul: int, fpt: int) -> dict:
    """The JSON line's description of the model and the run."""
    model = {k: getattr(arch, k) for k in ARCH_NAMES}
    model.update(params=arch.num_params(), params_matmul=n_matmul)
    return {
        "model": model,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "flops_per_token": fpt,
    }


def run_both(args, arch, batches, wrap=guarded, device="cpu", engine=None) -> dict:
    """``{side: {precision: figures}}``, each run through ``wrap``."""
    results: dict[str, dict[str, dict]] = {"transformers": {}, "ours": {}}
    # The baseline first: see the module docstring (compat layer stays active afterwards).
    for prec in args.precisions:
        print(f"transformers {prec} ...", flush=True)
        results["transformers"][prec] = wrap(run_transformers, args, arch, prec, batches, device)

    from minitron_mcore.parallel import ParallelConfig, parallel_context

    with parallel_context(ParallelConfig(), SEED):
        for prec in args.precisions:
            print(f"ours {prec} ...", flush=True)
            results["ours"][prec] = wrap(run_ours, args, arch, prec, batches, engine)
    return results


# One row per side and precision; the device's own columns go between FLOP/s and the losses.
ROW = "{side:<13}{prec:<6}{tokens_per_s:>10.0f}{step_s_median:>9.{step_digits}f}{flops:>9.1f}"
ROW += "{mfu:>8.1%}{extra}{loss:>20}"
TITLES = dict(side="side", prec="prec", tokens_per_s="tokens/s", step_s_median="s/step")
TITLES.update(mfu="MFU", loss="loss first->last")


def print_results(results: dict, flops_unit: str, step_digits: int, extra: str) -> None:
    """The table; ``extra``: the device's column as ``{field:>width...}``."""
    row = ROW.replace("{step_digits}", str(step_digits)).replace("{extra}", extra)
    rows, scale = [], {"GFLOP/s": 1e9, "TFLOP/s": 1e12}[flops_unit]
    for name, side in results.items():
        for prec, r in side.items():
            if not r["ok"]:
                rows.append(f"{name:<13}{prec:<6}  FAILED: {r['error']}")
                continue
            loss = f"{r['loss_first']:>11.3f} ->{r['loss_last']:>6.3f}"
            rows.append(
                dict(r, side=name, prec=prec, flops=r["model_flops_per_s"] / scale, loss=loss)
            )
    titles = dict(TITLES, flops=flops_unit, tokens_per_cpu_s="tok/CPU-s", peak_mem_gib="peak GiB")
    print(harness.fixed_table(row, titles, rows, rule=True))


def exit_code(results: dict) -> int:
    return 1 if any(not r["ok"] for side in results.values() for r in side.values()) else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return main_cuda(args) if args.device == "cuda" else main_cpu(args)


def main_cpu(args) -> int:
    arch = make_arch(args)
    fpt, n_matmul = flops_per_token(arch, args.seq_len)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}",
        flush=True,
    )
    print_model(args, arch, fpt, n_matmul)

    load_before = load_note("before")
    peaks = {}
    for prec in args.precisions:
        peaks[prec] = matmul_peak(DTYPES[prec])
        print(
            f"peak {prec}: {fmt_rate(peaks[prec]['flops'])} ({peaks[prec]['size']}^2 mm)",
            flush=True,
        )

    results = run_both(args, arch, make_batches(args, args.warmup + args.steps))
    load_after = load_note("after")
    add_mfu(results, fpt, {k: v["flops"] for k, v in peaks.items()})

    print()
    print_results(results, "GFLOP/s", 2, "{tokens_per_cpu_s:>10.0f}")
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
    out = {"bench": "train", "torch": torch.__version__, "threads": torch.get_num_threads()}
    out.update(machine_before=load_before, machine_after=load_after)
    out.update(run_json(args, arch, n_matmul, fpt))
    out["peak_flops"] = {k: v["flops"] for k, v in peaks.items()}
    out.update(results=results, ratio_tokens_per_s=ratios, ratio_tokens_per_cpu_s=cpu_ratios)
    print(json.dumps(out))
    return exit_code(results)


# ---------------------------------------------------------------------------------------- cuda

# Dense bf16 tensor-core peaks in TFLOP/s - no 2:4 structured sparsity; NVIDIA's datasheets
# quote twice these "with sparsity" - matched in this order against the lower-cased
# torch.cuda.get_device_name() (the first match wins, so a longer name comes before the name
# it contains).
GPU_BF16_PEAKS = (
    ("gh200", 989.4, "GH200 (an H100 SXM's tensor cores)"),  # "NVIDIA GH200 480GB"
    ("h100 pcie", 756.5, "H100 PCIe"),  # 1,513 with sparsity
    ("h100 nvl", 835.5, "H100 NVL"),  # 1,671 with sparsity
    ("h100", 989.4, "H100 SXM"),  # "NVIDIA H100 80GB HBM3"; 1,979 with sparsity
    ("h200 nvl", 835.5, "H200 NVL"),  # 1,671 with sparsity
    ("h200", 989.4, "H200 SXM"),  # 1,979 with sparsity
    ("a100", 312.0, "A100"),  # SXM4 and PCIe, 40 and 80 GB; 624 with sparsity
    ("l40s", 362.05, "L40S"),  # 733 with sparsity
    ("gb200", 2500.0, "GB200 (per GPU)"),  # 5,000 with sparsity
    ("b200", 2250.0, "B200 (HGX)"),  # 4,500 with sparsity
)
GIB = harness.GIB


def datasheet_peak(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, which datasheet entry) for a known GPU, else None."""
    name = device_name.lower()
    for key, tflops, label in GPU_BF16_PEAKS:
        if key in name:
            return tflops * 1e12, label
    return None


def on_gpu(fn, *a) -> dict:
    """``guarded(fn, *a)`` with its own peak-memory window; memory is freed before and after,
    so each side's peak is its own."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    r = guarded(fn, *a)
    r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / GIB
    gc.collect()
    torch.cuda.empty_cache()
    return r


def gpu_note() -> dict:
    """The GPU and how much of its memory is free (another process on it skews the timings)."""
    name = torch.cuda.get_device_name()
    free, total = torch.cuda.mem_get_info()
    busy = free < 0.9 * total
    warn = "  WARNING: other processes hold GPU memory; figures not comparable" if busy else ""
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), {name}, "
        f"{total / GIB:.1f} GiB ({free / GIB:.1f} free){warn}",
        flush=True,
    )
    return {"name": name, "memory_gib": total / GIB, "free_gib": free / GIB, "contended": busy}


def gpu_peak(device_name: str) -> dict:
    """The bf16 peak MFU is measured against, and the measured ``torch.mm`` rate."""
    mm = matmul_peak(
        torch.bfloat16, sizes=(4096, 8192), device="cuda", work=2e13, sync=torch.cuda.synchronize
    )
    sheet = datasheet_peak(device_name)
    flops, source = sheet if sheet else (mm["flops"], "measured bf16 torch.mm (GPU not in table)")
    if sheet:
        source = f"datasheet {source}, dense bf16"
    print(
        f"peak bf16: {flops / 1e12:.1f} TFLOP/s ({source}); measured {mm['size']}^2 bf16 mm: "
        f"{mm['flops'] / 1e12:.1f} TFLOP/s",
        flush=True,
    )
    return {"flops": flops, "source": source, "measured_mm_flops": mm["flops"]}


def main_cuda(args) -> int:
    if not torch.cuda.is_available():
        print("error: --device cuda: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    arch = make_arch(args)
    fpt, n_matmul = flops_per_token(arch, args.seq_len)
    gpu = gpu_note()
    print_model(args, arch, fpt, n_matmul)
    peak = gpu_peak(gpu["name"])
    batches = make_batches(args, args.warmup + args.steps)
    engine: dict = {}
    results = run_both(args, arch, batches, wrap=on_gpu, device="cuda", engine=engine)
    print(f"ours: {json.dumps(engine)}", flush=True)
    add_mfu(results, fpt, {"bf16": peak["flops"]})

    print()
    print_results(results, "TFLOP/s", 3, "{peak_mem_gib:>10.1f}")
    print()
    a, b = results["ours"]["bf16"], results["transformers"]["bf16"]
    ratio = mem_ratio = None
    if a["ok"] and b["ok"]:
        ratio, mem_ratio = (
            a["tokens_per_s"] / b["tokens_per_s"],
            a["peak_mem_gib"] / b["peak_mem_gib"],
        )
        print(f"ours / transformers tokens/s, bf16: {ratio:.2f}x (peak memory {mem_ratio:.2f}x)")
    else:
        print("ours / transformers tokens/s, bf16: n/a (a run failed)")
    out = {"bench": "train", "device": "cuda", "torch": torch.__version__}
    out.update(cuda=torch.version.cuda, gpu=gpu, **run_json(args, arch, n_matmul, fpt))
    out.update(peak_flops={"bf16": peak["flops"]}, peak_flops_source=peak["source"])
    out.update(measured_mm_flops={"bf16": peak["measured_mm_flops"]}, ours_engine=engine)
    out.update(results=results, ratio_tokens_per_s={"bf16": ratio})
    out["ratio_peak_memory"] = {"bf16": mem_ratio}
    print(json.dumps(out))
    return exit_code(results)


if __name__ == "__main__":
    raise SystemExit(main())
