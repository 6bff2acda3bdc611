"""Benchmark: knowledge distillation - the KD loss's peak memory against a naive full-vocabulary
KL, and distillation tokens/s against a plain ``transformers`` KD loop.

Run from the repository root, in the project's virtualenv::

    python benchmarks/bench_distill.py                     # both parts, default sizes
    python benchmarks/bench_distill.py --parts memory --chunk-tokens 1024,512,256
    python benchmarks/bench_distill.py --parts speed --repeats 3
    python benchmarks/bench_distill.py --quick             # tiny sizes: a smoke run (~1 min)

Leave ``OMP_NUM_THREADS`` alone (torchrun gives each of its two ranks one thread).  Every
measurement runs in a fresh subprocess of this script: variants never see each other's memory,
and the ``transformers`` loops never run under the CPU compat layer (a ``TorchFunctionMode``
that stays active once Megatron has been set up).

(a) ``--parts memory``: peak memory of the KD loss, forward + backward, on what the last
    pipeline stage holds: final hidden states of student ``[n, h_s]`` and teacher ``[n, h_t]``
    (``n`` = micro-batch x sequence) and this rank's output-layer rows ``[V/tp, h]``, in
    ``--mem-dtype``; the student's hidden states and weight need gradients.
    ``naive``: ``z = h @ W.T`` for both, gathered to the full vocabulary on every rank at TP=2
    (an autograd all-gather whose backward keeps this rank's columns, as Megatron's
    ``gather_from_tensor_model_parallel_region``), then the fp32 full-vocabulary KL of
    ``testing.kd_reference.reference_kd`` (``F.log_softmax`` of both), backward to ``h_s`` and
    ``W_s``.  ``ours``: ``distill.losses.chunked_kd`` called as the distill objective calls it
    (with labels; hidden states through an identity whose backward all-reduces over TP), per
    ``--chunk-tokens``.  Method: one process per variant (two gloo ranks under ``torchrun`` at
    TP=2) builds the inputs, runs the loss once as a warm-up, drops the gradients, resets the
    kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``) and runs it again:
    peak = ``VmHWM`` after - ``VmRSS`` before (inputs excluded; the gradients of ``h_s`` and
    ``W_s`` it produces are included, equal on both sides).  torch's CPU allocator does not
    cache and tensors this large are ``mmap``-ed, so RSS follows the live tensors.  Without
    ``clear_refs``, RSS is sampled every 2 ms with psutil (the JSON says which).  Both sides'
    losses and gradient norms are printed: they must agree.  Default ``V`` = 32768 (Mistral
    7B's): every large buffer is ``[n, V]`` or ``[V, h]``, so the ratios depend on ``n``,
    ``h`` and the chunk, not on ``V``; Llama 3's 128256 needs ~4x the memory for the naive
    side (``--mem-vocab 128256`` to measure it on a larger machine). Default ``n`` = 1 x 4096
    tokens, one micro-batch of a 4K-sequence run (the papers train at 8K): the chunked loss's
    buffers scale with the chunk, the naive loss's with ``n``, so the ratio is about
    chunk / n plus the gradients both sides produce.

(b) ``--parts speed``: distillation tokens/s, Llama-shaped teacher (8 layers, hidden 512) and a
    width- and depth-pruned student (4 layers, hidden 384, 3 of 4 query groups, ffn 1024),
    random weights, same random tokens, one micro-batch = the global batch per optimizer step.
    ours: the engine's ``train.step.train_step`` (Megatron schedule, DDP, optimizer, LR
    scheduler) with ``distill.objective.kd_objective`` (``TeacherStudent`` + ``chunked_kd``):
    what ``Trainer.train_step`` runs, without the dataset reads; bf16 = bf16 models with fp32
    main parameters, teacher in the training dtype (``distill.teacher_dtype=auto``).
    transformers: ``LlamaForCausalLM`` teacher (eval, ``no_grad``) and student from the same
    shapes (``hf_config_from_arch``; SDPA attention), ``F.kl_div`` of fp32 ``F.log_softmax``
    per token, ``clip_grad_norm_``, ``AdamW``; bf16 = student in fp32 under ``autocast`` (as
    ``bench_train.py``), frozen teacher cast to bf16.

(d) the same with a third student trained from the teacher's stored top-k (``--top-k``; rows
    held in memory: the disk read is not measured) by ``offline_kd_objective``: its step time /
    the CE step's, the teacher-logits pass per batch (teacher forward, top-k, encoding), and the
    number of students x epochs reading the same logits from which storing them pays.

(c) KD step time / CE step time of the same student, each side on its own engine (ours:
    ``lm_forward_step``; transformers: ``model(input_ids, labels=...)``), KD and CE steps
    interleaved in one process with alternating order (separate, identical students).  The
    FLOP ratio of the two steps (teacher forward + student step over student step) is printed:
    no implementation gets below it by much.

Goals (the issue): (a) ours <= 0.25x naive at TP=1, <= 0.15x per rank at TP=2; (b) ours >= 1.5x
transformers; (c) ours <= 1.3x (transformers ~1.6-1.7x); (d) offline <= 1.15x.  Prints
tables, the ratios against the goals and one JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_train import (  # noqa: E402  (the sibling benchmark: shared loop pieces)
    DTYPES,
    SEED,
    flops_per_token,
    guarded,
    hf_adamw,
    hf_update,
    llama_arch,
    load_note,
    make_batches,
    train_config,
)
from harness import MiB, csv  # noqa: E402

GOALS = {  # name: (goal, "<=" or ">=", description)
    "memory_tp1": (0.25, "<=", "(a) KD loss peak memory, ours / naive, TP=1"),
    "memory_tp2": (0.15, "<=", "(a) KD loss peak memory per rank, ours / naive, TP=2"),
    "kd_tokens_per_s": (1.5, ">=", "(b) distillation tokens/s, ours / transformers"),
    "kd_over_ce_ours": (1.3, "<=", "(c) KD step / CE step, ours"),
    "offline_over_ce_ours": (1.15, "<=", "(d) KD step from stored top-k / CE step, ours"),
}
MODEL_FIELDS = ("layers", "hidden", "ffn", "heads", "kv_heads")
TEACHER = dict(layers=8, hidden=512, ffn=1536, heads=8, kv_heads=4)
STUDENT = dict(layers=4, hidden=384, ffn=1024, heads=6, kv_heads=3)
QUICK = dict(mem_vocab=8192, mem_seq_len=128, mem_student_hidden=64, mem_teacher_hidden=96)
QUICK.update(chunk_tokens="64", vocab_size=512, seq_len=32, micro_batch=2, steps=2, warmup=1)
QUICK.update(teacher_layers=2, teacher_hidden=64, teacher_ffn=128)
QUICK.update(student_layers=1, student_hidden=48, student_ffn=96)
SIDES = ("transformers", "ours")


def parse_args(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--parts", default="memory,speed", help="comma list of memory, speed")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script")
    g = p.add_argument_group("(a) memory of the KD loss")
    g.add_argument("--mem-vocab", type=int, default=32768, help="V (see the docstring)")
    g.add_argument("--mem-micro-batch", type=int, default=1)
    g.add_argument("--mem-seq-len", type=int, default=4096)
    g.add_argument("--mem-student-hidden", type=int, default=1024)
    g.add_argument("--mem-teacher-hidden", type=int, default=1536)
    g.add_argument("--mem-dtype", default="bf16", help="comma list of fp32, bf16 (the inputs)")
    g.add_argument("--mem-tp", default="1,2", help="comma list of TP sizes (ranks on this host)")
    g.add_argument("--mem-warmup", type=int, default=1, help="loss runs before the measured one")
    g.add_argument("--chunk-tokens", help="comma list (default: distill.chunk_tokens's default)")
    g.add_argument(
        "--kd-impl",
        default="minitron_mcore.distill.losses:chunked_kd",
        help="module:function with chunked_kd's signature (to measure a candidate change)",
    )
    g = p.add_argument_group("(b, c) distillation speed")
    g.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16")
    g.add_argument("--steps", type=int, default=5, help="timed steps per objective")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps per objective")
    g.add_argument("--repeats", type=int, default=1, help="fresh processes per side")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--micro-batch", type=int, default=8, help="= global batch")
    g.add_argument("--vocab-size", type=int, default=8192)
    for who, d in (("teacher", TEACHER), ("student", STUDENT)):
        for f in MODEL_FIELDS:
            g.add_argument(f"--{who}-{f.replace('_', '-')}", type=int, default=d[f])
    g.add_argument("--chunk", type=int, default=1024, help="distill.chunk_tokens of (b, c)")
    g.add_argument("--top-k", type=int, default=64, help="k of (d), the stored top-k")
    g.add_argument(
        "--teacher-dtype",
        default="auto",
        choices=["auto", "bf16"],
        help="auto: the training precision (distill.teacher_dtype); bf16: also under fp32",
    )
    g.add_argument("--profile", action="store_true", help="print torch.profiler op tables")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a JSON job file
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    args.part_list, args.precisions = csv(args.parts), csv(args.precision)
    args.mem_dtypes, args.tp_sizes = csv(args.mem_dtype), [int(x) for x in csv(args.mem_tp)]
    bad = [x for x in args.precisions + args.mem_dtypes if x not in DTYPES]
    if bad or set(args.part_list) - {"memory", "speed"}:
        p.error(f"unknown precision {bad} or part in {args.part_list}")
    if args.chunk_tokens is None and args.worker is None and "memory" in args.part_list:
        from minitron_mcore.stages.distill import DistillOptions

        args.chunk_tokens = str(DistillOptions().chunk_tokens)
    args.chunks = [int(x) for x in csv(args.chunk_tokens or "1024")]
    return args


# ----------------------------------------------------------------- (a) memory: in a worker


class _GatherVocab(torch.autograd.Function):
    """[n, V/tp] -> [n, V] on every rank; backward keeps this rank's columns."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.rank, ctx.part = dist.get_rank(group), x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        a = ctx.rank * ctx.part
        return g[..., a : a + ctx.part].contiguous(), None


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over TP ranks (Megatron's
    ``copy_to_tensor_model_parallel_region``, as the distill objective applies it)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def make_loss_inputs(a, dtype, rank: int, tp: int) -> dict:
    """Hidden states (replicated over TP) and this rank's output-weight rows: the same values
    at every TP size (the full weights are drawn, then sliced)."""
    n, v = a["mem_micro_batch"] * a["mem_seq_len"], a["mem_vocab"]
    g = torch.Generator().manual_seed(SEED)
    x = {}
    for who, h in (("s", a["mem_student_hidden"]), ("t", a["mem_teacher_hidden"])):
        x["h" + who] = torch.randn(n, h, generator=g).to(dtype)
        w = torch.randn(v, h, generator=g).mul_(h**-0.5)  # logits ~ N(0, 1)
        x["w" + who] = w[rank * v // tp : (rank + 1) * v // tp].to(dtype).clone()
    x["labels"] = torch.randint(0, v, (n,), generator=g)
    x["mask"] = torch.ones(n)
    x["hs"].requires_grad_(True)
    x["ws"].requires_grad_(True)
    return x


def naive_loss(x, spec, group, rank, chunk, impl) -> torch.Tensor:
    from minitron_mcore.testing.kd_reference import reference_kd

    hs = x["hs"] if group is None else _CopyToTP.apply(x["hs"], group)
    zs = hs @ x["ws"].t()  # [n, V/tp]
    with torch.no_grad():
        zt = x["ht"] @ x["wt"].t()
    if group is not None:
        zs, zt = _GatherVocab.apply(zs, group), _GatherVocab.apply(zt, group)  # [n, V]
    kd, _ = reference_kd(zs, zt, spec)  # fp32 log_softmax of both, KL per token
    loss = (kd * x["mask"]).sum()
    loss.backward()
    return loss.detach()


def ours_loss(x, spec, group, rank, chunk, impl) -> torch.Tensor:
    hs = x["hs"] if group is None else _CopyToTP.apply(x["hs"], group)
    part = x["ws"].shape[0]
    kd_sum, _ = impl(
        hs, x["ws"], x["ht"], x["wt"], spec, x["mask"], x["labels"], rank * part, chunk, group
    )
    kd_sum.backward()
    return kd_sum.detach()


def mem_worker(job: dict) -> dict:
    """One variant of (a) on this rank."""
    import torch.distributed as dist

    from minitron_mcore.distill.losses import KDSpec

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    group = rank = None
    if tp > 1:
        dist.init_process_group("gloo")
        group, rank = dist.group.WORLD, dist.get_rank()
    rank = rank or 0
    module, _, name = job["kd_impl"].partition(":")
    impl = getattr(importlib.import_module(module), name)
    fn = {"naive": naive_loss, "ours": ours_loss}[job["variant"]]
    x = make_loss_inputs(job, DTYPES[job["dtype"]], rank, tp)
    spec = KDSpec(job["mem_vocab"])
    for _ in range(job["mem_warmup"]):
        fn(x, spec, group, rank, job["chunk"], impl)
        x["hs"].grad = x["ws"].grad = None
    with harness.PeakRSS() as m:
        t0 = time.perf_counter()
        loss = fn(x, spec, group, rank, job["chunk"], impl)
        seconds = time.perf_counter() - t0
    gw2 = x["ws"].grad.float().pow(2).sum()
    if group is not None:  # |grad W| over the whole vocabulary
        dist.all_reduce(gw2, group=group)
        dist.destroy_process_group()
    return {
        "rank": rank,
        "peak_bytes": m.peak,
        "base_rss_bytes": m.base,
        "method": m.method,
        "seconds": seconds,
        "loss": loss.item(),
        "grad_h_norm": x["hs"].grad.float().norm().item(),
        "grad_w_norm": gw2.sqrt().item(),
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------- (b, c) speed: in a worker


def model_arch(a: dict, who: str):
    shape = [a[f"{who}_{f}"] for f in MODEL_FIELDS] + [a["vocab_size"]]
    return llama_arch(shape, a["seq_len"])


def teacher_dtype(a: dict, precision: str) -> torch.dtype:
    return DTYPES[precision if a["teacher_dtype"] == "auto" else a["teacher_dtype"]]


def kd_flop_floor(a: dict) -> dict:
    """FLOPs of a KD step / a CE step of the student (bench_train's count: training = 3
    forward passes; the KL is elementwise, not counted)."""
    train_s, _ = flops_per_token(model_arch(a, "student"), a["seq_len"])
    train_t, _ = flops_per_token(model_arch(a, "teacher"), a["seq_len"])
    fwd_t = train_t / 3
    return {"student_train": train_s, "teacher_forward": fwd_t, "ratio": 1 + fwd_t / train_s}


def interleaved(a: dict, steps: dict, batches) -> dict:
    """Warm-up, then timed steps of every objective in turn (order alternating per step):
    wall and CPU seconds (this process, all threads) per step."""
    out = harness.timed_steps(steps, batches, a["warmup"])
    if a["profile"]:
        from torch.profiler import profile

        for n, fn in steps.items():
            with profile() as prof:
                fn(batches[0])
            print(f"--- {a['side']} {n}: one step ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return out


def hf_model(arch, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron_mcore.checkpoint.hf_mapping import hf_config_from_arch

    config = LlamaConfig.from_dict(hf_config_from_arch(arch, None, "fp32"))
    config.attention_dropout = 0.0
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(dtype)


def run_transformers(a: dict, precision: str, batches) -> dict:
    import torch.nn.functional as F

    bf16 = precision == "bf16"
    teacher = hf_model(model_arch(a, "teacher"), teacher_dtype(a, precision)).eval()
    teacher.requires_grad_(False)
    students = {n: hf_model(model_arch(a, "student"), torch.float32).train() for n in "ck"}
    opts = {n: hf_adamw(m) for n, m in students.items()}  # bench_train's settings

    def update(n, loss):
        return hf_update(students[n], opts[n], loss)

    def ce(batch):
        tokens = batch[:, :-1].contiguous()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = students["c"](input_ids=tokens, labels=tokens).loss  # shifts internally
        return update("c", loss)

    def kd(batch):
        tokens = batch[:, :-1].contiguous()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                zt = teacher(input_ids=tokens).logits
            zs = students["k"](input_ids=tokens).logits
            v = zs.shape[-1]
            log_ps = F.log_softmax(zs.float().view(-1, v), dim=-1)
            log_pt = F.log_softmax(zt.float().view(-1, v), dim=-1)
            loss = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")  # per token
        return update("k", loss)

    return interleaved(a, {"ce": ce, "kd": kd}, batches)


def run_ours(a: dict, precision: str, batches) -> dict:
    from minitron_mcore.distill.losses import KDSpec
    from minitron_mcore.distill.objective import KD, kd_objective, offline_kd_objective
    from minitron_mcore.models.build import build_model_for_stage
    from minitron_mcore.parallel import set_seed
    from minitron_mcore.train import optim
    from minitron_mcore.train.step import lm_forward_step, train_step

    s, b, total = a["seq_len"], a["micro_batch"], len(batches)
    cfg = train_config(total, s, b, precision, distributed_optimizer="false")
    set_seed(SEED)
    teacher = build_model_for_stage(model_arch(a, "teacher"), teacher_dtype(a, precision))
    runs = {}
    for name in ("ce", "kd"):  # two identical students: one per objective
        set_seed(SEED)
        kw = dict(calculate_per_token_loss=True)
        model = build_model_for_stage(model_arch(a, "student"), DTYPES[precision], **kw)
        ddp = optim.wrap_ddp(model, model.config, distributed_optimizer=False)
        opt = optim.build_optimizer(ddp, cfg, model.config, False)
        optim.attach_to_config(model.config, ddp, opt)
        runs[name] = (ddp, opt, optim.build_scheduler(opt, cfg, total))
    objective = kd_objective(teacher, KDSpec(a["vocab_size"]), a["chunk"])
    pair = objective.schedule_model(runs["kd"][0])
    lm_step = lm_forward_step(a["vocab_size"])
    pos = torch.arange(s).unsqueeze(0).expand(b, -1).contiguous()
    mask = torch.ones(b, s)
    where = {id(x): i for i, x in enumerate(batches)}

    def micro(batch):
        x = {"tokens": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}
        first = where[id(batch)] * b  # the samples' positions in the read order
        return [dict(x, position_ids=pos, loss_mask=mask, positions=torch.arange(first, first + b))]

    # (d) the teacher's pass once (timed per batch), its rows kept in memory, and a third
    # student trained from them
    store, passes = teacher_rows(teacher, batches, micro, a["top_k"], a["vocab_size"])
    set_seed(SEED)
    model = build_model_for_stage(
        model_arch(a, "student"), DTYPES[precision], calculate_per_token_loss=True
    )
    ddp = optim.wrap_ddp(model, model.config, distributed_optimizer=False)
    opt = optim.build_optimizer(ddp, cfg, model.config, False)
    optim.attach_to_config(model.config, ddp, opt)
    runs["off"] = (ddp, opt, optim.build_scheduler(opt, cfg, total))
    offline = offline_kd_objective(store, None, KDSpec(a["vocab_size"]), False)

    def ce(batch):
        ddp, opt, sched = runs["ce"]
        return train_step(ddp, opt, sched, lm_step, micro(batch), s)[0]["lm loss"]

    def kd(batch):
        _, opt, sched = runs["kd"]
        shapes = objective.adjust_tensor_shapes_fn
        reports = train_step(pair, opt, sched, objective.forward_step, micro(batch), s, shapes)
        return reports[0][objective.primary]

    def off(batch):
        ddp, opt, sched = runs["off"]
        return train_step(ddp, opt, sched, offline.forward_step, micro(batch), s)[0][KD]

    out = interleaved(a, {"ce": ce, "kd": kd, "off": off}, batches)
    out["pass"] = passes
    return out


class _MemoryStore:
    """Stored rows held in memory, read as ``distill.logit_store.LogitStore`` reads a shard
    (the benchmark measures the step, not the disk)."""

    def __init__(self, info, rows):
        self.info, self._rows = info, rows

    def rows(self, positions):
        return self._rows[list(positions)]


def teacher_rows(teacher, batches, micro, k: int, vocab: int):
    """The teacher's top-k rows of every batch (what ``minitron teacher-logits`` computes per
    micro-batch), in memory, and the time of each batch's pass."""
    import numpy as np

    from minitron_mcore.distill.logit_store import StoreInfo
    from minitron_mcore.distill.offline import teacher_top_k
    from minitron_mcore.distill.topk_codec import encode

    rows, out = [], {"step_s": [], "cpu_s": [], "losses": []}
    teacher.eval()
    for batch in batches:
        mb = micro(batch)[0]
        clock = harness.Clock()
        with torch.no_grad():
            z = teacher(mb["tokens"], mb["position_ids"], None)  # [b, s, V]
            ids, logp, tail = teacher_top_k(z.reshape(-1, z.shape[-1]).float(), k, vocab)
            rows.append(encode(ids, logp, tail, vocab, "bf16").reshape(*z.shape[:2], -1))
        out["step_s"].append(clock.wall())
        out["cpu_s"].append(clock.cpu())
    rows = np.concatenate(rows)
    info = StoreInfo("bench", k, "bf16", vocab, rows.shape[1], rows.shape[0], rows.shape[0])
    return _MemoryStore(info, rows), out


def speed_worker(job: dict) -> dict:
    """Both objectives of one side, every precision."""
    ns = argparse.Namespace(**job)
    batches = make_batches(ns, job["warmup"] + job["steps"])
    run = run_transformers if job["side"] == "transformers" else run_ours
    if job["side"] == "transformers":
        return {p: guarded(run, job, p, batches) for p in job["precisions"]}
    from minitron_mcore.parallel import ParallelConfig, parallel_context

    with parallel_context(ParallelConfig(), SEED):
        return {p: guarded(run, job, p, batches) for p in job["precisions"]}


# ----------------------------------------------------------------------------- the driver


def worker(job: dict) -> dict:
    return mem_worker(job) if job["kind"] == "mem" else speed_worker(job)


def launch(job: dict, nproc: int) -> dict:
    """This script as a worker on ``job`` (``torchrun`` for ``nproc`` > 1)."""
    return harness.run_worker(os.path.abspath(__file__), job, nproc, echo=job.get("profile"))


def run_memory(args) -> dict:
    """(a): ``{dtype: {tp: {variant: result}}}``; peak and time are the max over ranks."""
    out = {}
    variants = [("naive", 0)] + [("ours", c) for c in args.chunks]
    for dtype in args.mem_dtypes:
        for tp in args.tp_sizes:
            for var, chunk in variants:
                name = "naive" if var == "naive" else f"ours:{chunk}"
                print(f"(a) {dtype} TP={tp} {name} ...", flush=True)
                job = dict(vars(args), kind="mem", variant=var, chunk=chunk, dtype=dtype)
                r = launch(job, tp)
                if r["ok"]:
                    ranks = r["ranks"]
                    r.update({k: max(x[k] for x in ranks) for k in ("peak_bytes", "seconds")})
                    r.update({k: ranks[0][k] for k in ("loss", "grad_h_norm", "grad_w_norm")})
                    r["method"] = ranks[0]["method"]
                out.setdefault(dtype, {}).setdefault(str(tp), {})[name] = r
    return out


def run_speed(args) -> dict:
    """(b, c): ``{side: {precision: {objective: figures}}}``; the step times of all repeats
    are pooled (median)."""
    runs = {s: [] for s in SIDES}
    for rep in range(args.repeats):
        for side in SIDES:  # alternate the sides, so load changes hit both
            print(f"(b, c) {side}, repeat {rep + 1}/{args.repeats} ...", flush=True)
            r = launch(dict(vars(args), kind="speed", side=side), 1)
            runs[side].append(r["ranks"][0] if r["ok"] else {"error": r["error"]})
    tokens = args.micro_batch * args.seq_len
    out = {}
    for side, reps in runs.items():
        for prec in args.precisions:
            res = [r.get(prec, {"ok": False, "error": r.get("error")}) for r in reps]
            bad = [r for r in res if not r.get("ok", True)]
            if bad:
                out.setdefault(side, {})[prec] = {"ok": False, "error": str(bad[0]["error"])}
                continue
            fig = {"ok": True}
            for obj in [o for o in ("ce", "kd", "off", "pass") if o in res[0]]:
                times = [t for r in res for t in r[obj]["step_s"]]
                cpu = [t for r in res for t in r[obj]["cpu_s"]]
                fig[obj] = {
                    "tokens_per_s": tokens / statistics.median(times),
                    "tokens_per_cpu_s": tokens / statistics.median(cpu),
                    "step_s_median": statistics.median(times),
                    "cpu_s_median": statistics.median(cpu),
                    "step_s": times,
                    "cpu_s": cpu,
                    "loss_first": (res[0][obj]["losses"] or [None])[0],
                    "loss_last": (res[0][obj]["losses"] or [None])[-1],
                }
            out.setdefault(side, {})[prec] = fig
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def ratios_of(args, mem: dict | None, speed: dict | None) -> dict:
    out = {}
    if mem is not None:  # ours / naive peak: {dtype: {tp: {chunk: ratio}}}
        out["memory"] = {}
        for dtype, by_tp in mem.items():
            for tp, r in by_tp.items():
                naive = r["naive"].get("peak_bytes")
                out["memory"].setdefault(dtype, {})[tp] = {
                    str(c): _ratio(r[f"ours:{c}"].get("peak_bytes"), naive) for c in args.chunks
                }
    if speed is not None:
        for suffix, key in (("", "tokens_per_s"), ("_cpu_time", "tokens_per_cpu_s")):

            def tps(side, prec, obj, key=key):
                r = speed[side][prec]
                return r[obj][key] if r["ok"] else None

            out["kd_tokens_per_s" + suffix] = {
                p: _ratio(tps("ours", p, "kd"), tps("transformers", p, "kd"))
                for p in args.precisions
            }
            out["kd_over_ce" + suffix] = {  # KD step time / CE step time
                s: {p: _ratio(tps(s, p, "ce"), tps(s, p, "kd")) for p in args.precisions}
                for s in SIDES
            }
            out["offline_over_ce" + suffix] = {
                p: _ratio(tps("ours", p, "ce"), tps("ours", p, "off")) for p in args.precisions
            }
        out["break_even"] = {}  # students x epochs from which the stored logits pay
        for p in args.precisions:
            r = speed["ours"][p]
            if r["ok"] and "off" in r:
                saved = r["kd"]["step_s_median"] - r["off"]["step_s_median"]
                out["break_even"][p] = r["pass"]["step_s_median"] / saved if saved > 0 else None
    return out


def goals_of(args, ratios: dict) -> list[dict]:
    rows = []
    first = str(args.chunks[0])
    for dtype, by_tp in ratios.get("memory", {}).items():
        for tp in ("1", "2"):
            if tp in by_tp:
                rows.append((f"memory_tp{tp}", f"{dtype}, chunk {first}", by_tp[tp][first]))
    rows += [("kd_tokens_per_s", p, v) for p, v in ratios.get("kd_tokens_per_s", {}).items()]
    rows += [
        ("kd_over_ce_ours", p, v) for p, v in ratios.get("kd_over_ce", {}).get("ours", {}).items()
    ]
    rows += [("offline_over_ce_ours", p, v) for p, v in ratios.get("offline_over_ce", {}).items()]
    out = []
    for key, where, value in rows:
        goal, op, _ = GOALS[key]
        met = None if value is None else (value <= goal if op == "<=" else value >= goal)
        out.append({"goal": key, "where": where, "value": value, "target": f"{op} {goal}"})
        out[-1]["met"] = met
    return out


# The tables: a row template per part, every column's title.
MEMORY_ROW = "{dtype:<6}{tp:>3}  {label:<22}{peak:>9.0f}{ratio:>8}{seconds:>8.2f}{loss:>13.6g}"
MEMORY_ROW += "{grad_h_norm:>10.5g}{grad_w_norm:>10.5g}"
SPEED_ROW = "{side:<14}{prec:<6}{obj:<13}{tokens_per_s:>10.0f}{step_s_median:>9.3f}"
SPEED_ROW += "{cpu_s_median:>8.3f}{losses:>20}"
TITLES = dict(dtype="dtype", tp="TP", label="variant", peak="peak MiB", ratio="x naive")
TITLES.update(seconds="s", loss="loss", grad_h_norm="|grad h|", grad_w_norm="|grad W|")
TITLES.update(side="side", prec="prec", obj="objective", tokens_per_s="tokens/s")
TITLES.update(step_s_median="s/step", cpu_s_median="CPU s", losses="loss first->last")


def memory_rows(mem: dict):
    for dtype, by_tp in mem.items():
        for tp, res in by_tp.items():
            for name, r in res.items():
                label = "naive fp32 KL" if name == "naive" else f"chunked_kd chunk {name[5:]}"
                if not r["ok"]:
                    yield f"{dtype:<6}{tp:>3}  {label:<22} FAILED"
                    continue
                ratio = _ratio(r["peak_bytes"], res["naive"].get("peak_bytes"))
                ratio = "n/a" if ratio is None else f"{ratio:.3f}"
                yield dict(
                    r, dtype=dtype, tp=tp, label=label, ratio=ratio, peak=r["peak_bytes"] / MiB
                )


def speed_rows(speed: dict):
    for side, by_prec in speed.items():
        for prec, r in by_prec.items():
            if not r["ok"]:
                yield f"{side:<14}{prec:<6}  FAILED: {r['error'][:200]}"
                continue
            for obj in [o for o in ("ce", "kd", "off", "pass") if o in r]:
                x = r[obj]
                losses = ""
                if x["loss_first"] is not None:
                    losses = f"{x['loss_first']:>11.3f} ->{x['loss_last']:>7.3f}"
                name = {"off": "kd stored", "pass": "teacher pass"}.get(obj, obj)
                yield dict(x, side=side, prec=prec, obj=name, losses=losses)


def print_memory(args, mem: dict) -> None:
    print(
        f"\n(a) KD loss forward+backward: V={args.mem_vocab}, n={args.mem_micro_batch}x"
        f"{args.mem_seq_len} tokens, h_s={args.mem_student_hidden}, "
        f"h_t={args.mem_teacher_hidden}; peak RSS above the inputs, max over ranks"
    )
    print(harness.fixed_table(MEMORY_ROW, TITLES, list(memory_rows(mem)), rule=True))
    methods = {r["method"] for t in mem.values() for v in t.values() for r in v.values() if r["ok"]}
    print(f"(peak by {', '.join(sorted(methods))}; includes the gradients of h_s and W_s)")


def print_speed(args, speed: dict, floor: dict) -> None:
    print(
        f"\n(b, c) one optimizer step on {args.micro_batch}x{args.seq_len} tokens, vocab "
        f"{args.vocab_size}, {args.repeats} process(es) x {args.steps} timed steps per side"
    )
    print(harness.fixed_table(SPEED_ROW, TITLES, list(speed_rows(speed)), rule=True))
    print(
        f"FLOPs/token: student training {floor['student_train'] / 1e6:.1f}M, teacher forward "
        f"{floor['teacher_forward'] / 1e6:.1f}M: a KD step is {floor['ratio']:.2f}x a CE step"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        harness.worker_main(args.worker, worker)
        return 0
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        flush=True,
    )
    result = {"bench": "distill", "torch": torch.__version__, "machine_before": load_note("before")}
    mem = run_memory(args) if "memory" in args.part_list else None
    speed = run_speed(args) if "speed" in args.part_list else None
    result["machine_after"] = load_note("after")
    if mem is not None:
        keys = ("mem_vocab", "mem_micro_batch", "mem_seq_len", "mem_student_hidden")
        result["memory"] = {k: getattr(args, k) for k in keys + ("mem_teacher_hidden",)}
        result["memory"].update(chunk_tokens=args.chunks, kd_impl=args.kd_impl, results=mem)
        print_memory(args, mem)
    if speed is not None:
        keys = ("seq_len", "micro_batch", "vocab_size", "chunk", "teacher_dtype", "steps")
        result["speed"] = {k: getattr(args, k) for k in keys + ("warmup", "repeats")}
        for who in ("teacher", "student"):
            result["speed"][who] = {f: getattr(args, f"{who}_{f}") for f in MODEL_FIELDS}
        result["speed"].update(flop_floor=kd_flop_floor(vars(args)), results=speed)
        print_speed(args, speed, result["speed"]["flop_floor"])
    result["ratios"] = ratios = ratios_of(args, mem, speed)
    result["goals"] = goals = goals_of(args, ratios)
    print("\nratios against the goals")
    for g in goals:
        v = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        verdict = {True: "met", False: "MISSED", None: "n/a"}[g["met"]]
        print(f"{GOALS[g['goal']][2]} [{g['where']}]: {v} (goal {g['target']}): {verdict}")
    for prec, v in ratios.get("break_even", {}).items():
        v = "n/a" if v is None else f"{v:.2f}"
        print(
            f"(d) teacher-logits pass / (online KD step - offline KD step) [{prec}]: {v} "
            "students x epochs to break even"
        )
    for prec, v in ratios.get("kd_over_ce", {}).get("transformers", {}).items():
        v = "n/a" if v is None else f"{v:.3f}"
        print(f"(c) KD step / CE step, transformers [{prec}]: {v} (the issue: 1.6-1.7)")
    for prec in ratios.get("kd_tokens_per_s_cpu_time", {}):
        by_cpu = [
            ratios["kd_tokens_per_s_cpu_time"][prec],
            ratios["kd_over_ce_cpu_time"]["ours"][prec],
            ratios["kd_over_ce_cpu_time"]["transformers"][prec],
        ]
        b, c, t = ("n/a" if v is None else f"{v:.3f}" for v in by_cpu)
        print(f"by CPU time [{prec}]: (b) {b}, (c) ours {c}, transformers {t}")
    print(json.dumps(result))
    return 1 if any(g["value"] is None for g in goals) else 0


if __name__ == "__main__":
    raise SystemExit(main())
