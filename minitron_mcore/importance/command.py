"""``minitron importance``: activation-based importance scores from a calibration set.

    minitron importance load=CKPT save=runs/scores data.train=[my.jsonl] importance.num_samples=1024
    torchrun --nproc-per-node 4 -m minitron_mcore importance load=CKPT save=runs/scores \\
        parallel.tp=2 parallel.pp=2

Works at any TP/PP/DP: each TP rank scores its own heads and neurons and the scores are gathered
into one global ranking; each pipeline stage scores its own layers; data-parallel ranks see
different calibration samples and their statistics are summed. (Megatron-LM's and Model
Optimizer's Minitron pruning require TP = 1.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from minitron_mcore.checkpoint.layout import resolve_tokenizer_path
from minitron_mcore.checkpoint.megatron import load_model, read_meta
from minitron_mcore.checkpoint.rerun import already_done, fingerprint
from minitron_mcore.data.datasets import DataConfig, GlobalBatches, build_eval_dataset, require_data
from minitron_mcore.data.tokenizer import Tokenizer, check_tokenizer_vocab
from minitron_mcore.errors import MinitronError, require
from minitron_mcore.importance.aggregate import BATCH_AGGS, SEQ_AGGS, all_scores
from minitron_mcore.importance.hooks import ActivationCollector, LayerInputCache, skip_layers
from minitron_mcore.importance.moe import ExpertCollector, stack_experts
from minitron_mcore.importance.scores import Scores, scores_fingerprint
from minitron_mcore.parallel import ParallelConfig, fail_together, parallel_context
from minitron_mcore.train.loop import evaluate
from minitron_mcore.train.step import lm_forward_step
from minitron_mcore.utils.log import emit_metrics, log0, progress


@dataclass
class ImportanceConfig:
    """``importance.*``: what is measured and how it is aggregated."""

    num_samples: int = 1024
    """Calibration samples (the papers use 1024)."""
    seq_length: int = 512
    """Tokens per calibration sample (capped at the model's maximum)."""
    micro_batch_size: int = 4
    seq_agg: str = "mean"
    """Reduction over the sequence: mean or l2 (papers' best: mean)."""
    batch_agg: str = "l2"
    """Reduction over samples: mean, l2 or var (papers' best: l2)."""
    layer_loss_samples: int = 64
    """Samples for the LM-loss-without-layer(s) metric (one pass per candidate); 0 = skip."""
    block_sizes: list = field(default_factory=lambda: [1])
    """Contiguous block sizes whose removal loss is measured (depth pruning picks a block)."""
    layer_cache_gb: float = 8.0
    """Memory (GiB per rank, on the model's device) the layer-removal passes may use to keep
    every layer's input for the ``layer_loss_samples``, so each pass restarts at the removed
    block instead of at the first layer (about half the compute). Used at pipeline size 1 when
    the inputs fit; 0 = off."""
    layer_metric: str = ""
    """Optional user metric ``module:function``; called as fn(model) -> float with each single
    layer skipped, higher = better model (e.g. a task accuracy)."""


@dataclass
class ImportanceCommandConfig:
    """``minitron importance``: score a checkpoint on calibration data."""

    load: str = ""
    save: str = ""
    """Output scores directory."""
    data: DataConfig = field(default_factory=DataConfig)
    """``data.train`` is the calibration source."""
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234
    overwrite: bool = False


def _reduce_and_gather(collector: ActivationCollector) -> dict[str, torch.Tensor]:
    """DP-sum the statistics, gather TP-partitioned channels, finalise every aggregation."""
    from megatron.core import parallel_state as ps

    out = {}
    for name in sorted(collector.acc):
        acc = collector.acc[name]
        flat = acc.flat()
        dist.all_reduce(flat, group=ps.get_data_parallel_group())
        acc.load_flat(flat)
        stats = dict(acc.stats)
        if name.endswith((".heads", ".mlp")) and ps.get_tensor_model_parallel_world_size() > 1:
            for k, v in stats.items():
                if k != "count":
                    parts = [
                        torch.empty_like(v)
                        for _ in range(ps.get_tensor_model_parallel_world_size())
                    ]
                    dist.all_gather(
                        parts, v.contiguous(), group=ps.get_tensor_model_parallel_group()
                    )
                    stats[k] = torch.cat(parts)  # TP ranks hold consecutive channel blocks
        for agg, score in all_scores(stats).items():
            out[f"{name}.{agg}"] = score.cpu()
    return out


def _layer_tensors(local: dict[str, torch.Tensor], collector, num_layers: int, experts) -> dict:
    """Per-layer scores of this stage (``experts``: this rank's expert entries,
    :meth:`ExpertCollector.reduce`) -> merged over pipeline stages and expert-parallel ranks
    (every rank gets all)."""
    from megatron.core import parallel_state as ps

    tensors = {}
    for k, v in local.items():  # "3.norm_in.mean-l2" -> hidden channels of layer 3
        layer, site, agg = k.split(".")
        site = "hidden" if site.startswith("norm") else site
        key = f"layer{layer}.{site}.{agg}"
        tensors[key] = tensors[key] + v if key in tensors else v
    tensors.update(experts)
    bi = torch.zeros(num_layers)
    for i, (total, n) in collector.bi.items():
        red = torch.stack([total, n])
        dist.all_reduce(red, group=ps.get_data_parallel_group())
        bi[i] = (red[0] / red[1].clamp(min=1)).item()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (tensors, bi))
    merged, bi_all = {}, torch.zeros(num_layers)
    for t, b in parts:
        merged.update(t)
        bi_all = torch.maximum(bi_all, b)
    merged["layer_bi"] = bi_all
    return stack_experts(merged)


def _ticking(batches, bar):
    """``batches`` again, advancing ``bar`` as each global batch's forward passes finish."""
    for b in batches:
        yield b
        bar.update(1)


def _layer_losses(model, fwd, batches, seq, arch, block_sizes, metric_fn, cache_gb):
    from megatron.core import parallel_state as ps

    num_layers = arch.num_layers
    for n in block_sizes:
        require(1 <= n < num_layers, f"importance.block_sizes entry {n} must be in 1..L-1")
    # Restarting each pass from cached layer inputs halves the cost; it needs the whole model
    # on one stage and the inputs of every layer for every sample in memory.
    micro = sum(len(b) for b in batches)
    mbs = batches[0][0]["tokens"].shape[0]
    param = next(model.parameters())
    need = micro * (num_layers - 1) * mbs * seq * arch.hidden_size * param.element_size()
    budget = cache_gb * 2**30
    if param.device.type == "cuda":  # leave room for the passes themselves
        budget = min(budget, torch.cuda.mem_get_info(param.device)[0] - 2 * 2**30)
    cache = None
    if ps.get_pipeline_model_parallel_world_size() == 1 and need <= budget:
        cache = LayerInputCache(model)
    passes = sum(num_layers - n + 1 for n in block_sizes)
    log0(
        "layer-removal loss: %d passes over %d micro-batches, %s",
        passes,
        micro,
        f"restarting at the removed block from cached layer inputs ({need / 2**30:.2f} GiB)"
        if cache
        else "full passes (pipeline size > 1 or importance.layer_cache_gb too small)",
    )
    # One bar over every global batch of every pass: a pass over a large calibration set is
    # long on a big model, and the ETA covers all passes.
    bar = progress(None, "layer-removal loss", total=(passes + 1) * len(batches), unit="batch")
    bar.set_postfix_str("full model")
    with cache.capture() if cache else contextlib.nullcontext():
        out = {"base_loss": torch.tensor(evaluate(model, fwd, _ticking(batches, bar), seq))}
    for n in block_sizes:
        losses = []
        for i in range(num_layers - n + 1):
            bar.set_postfix_str(f"without layers {i}..{i + n - 1}")
            block = cache.without(i, n) if cache else skip_layers(model, set(range(i, i + n)))
            with block:
                losses.append(evaluate(model, fwd, _ticking(batches, bar), seq))
        out[f"layer_loss.block{n}"] = torch.tensor(losses)
    bar.close()
    del cache  # free the cached inputs before any user metric runs
    user = {}
    if metric_fn is not None:
        user["full"] = float(metric_fn(model))
        for i in progress(range(num_layers), "layer_metric", unit="layer"):
            with skip_layers(model, {i}):
                user[str(i)] = float(metric_fn(model))
    return out, user


def _metric_fn(spec: str):
    if not spec:
        return None
    require(":" in spec, f"importance.layer_metric={spec!r}: use module:function")
    module, name = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise MinitronError(f"cannot import importance.layer_metric={spec!r} ({e})") from e


def importance(cfg: ImportanceCommandConfig) -> dict:
    t0 = time.time()
    icfg = cfg.importance
    require_data(cfg.data)
    meta = read_meta(cfg.load)
    arch = meta.arch
    arch.check_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    require(icfg.seq_agg in SEQ_AGGS, f"importance.seq_agg must be one of {SEQ_AGGS}")
    require(icfg.batch_agg in BATCH_AGGS, f"importance.batch_agg must be one of {BATCH_AGGS}")
    require(icfg.num_samples > 0, "importance.num_samples must be positive")
    require(bool(cfg.save), "save= is empty; pass an output directory for the scores")
    fp = fingerprint("importance", cfg, {"load": cfg.load, "data.train": list(cfg.data.train)})
    done = already_done("importance", cfg.save, cfg.overwrite, fp, scores_fingerprint)
    if done:
        emit_metrics(done, cfg.save)
        return done
    seq = min(icfg.seq_length, arch.max_position_embeddings)
    metric_fn = _metric_fn(icfg.layer_metric)
    tok = Tokenizer(resolve_tokenizer_path(cfg.load))
    check_tokenizer_vocab(tok, arch.vocab_size)
    with parallel_context(cfg.parallel, cfg.seed):
        from megatron.core import parallel_state as ps

        dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        step = icfg.micro_batch_size * dp
        require(
            icfg.num_samples % step == 0,
            f"importance.num_samples={icfg.num_samples} is not divisible by "
            f"importance.micro_batch_size x data-parallel size = {step}",
        )
        model, _ = load_model(cfg.load, use_te=False)  # local spec: norms are hookable
        calib = dataclasses.replace(cfg.data, valid=list(cfg.data.train))
        ds = build_eval_dataset(calib, tok, seq, cfg.seed, icfg.num_samples)
        batches = GlobalBatches(ds, step, icfg.micro_batch_size, dpr, dp)
        fwd = lm_forward_step(arch.vocab_size)
        collector, experts = ActivationCollector(model), ExpertCollector(model)
        collector.attach()
        experts.attach()
        log0("importance: %d samples x %d tokens on %s", icfg.num_samples, seq, cfg.load)
        # Built lazily, so the progress follows the forward passes (the time is spent there).
        n_calib = icfg.num_samples // step
        lazy = (batches.get(i) for i in range(n_calib))
        calib_loss = evaluate(model, fwd, progress(lazy, "calibration", n_calib, unit="batch"), seq)
        collector.detach()
        experts.detach()
        tensors = _layer_tensors(
            _reduce_and_gather(collector), collector, arch.num_layers, experts.reduce()
        )
        user = {}
        if icfg.layer_loss_samples > 0:
            n = max(icfg.layer_loss_samples // step, 1)
            layer_batches = [batches.get(i) for i in range(n)]
            losses, user = _layer_losses(
                model,
                fwd,
                layer_batches,
                seq,
                arch,
                [int(b) for b in icfg.block_sizes],
                metric_fn,
                icfg.layer_cache_gb,
            )
            tensors.update(losses)
        info = {
            "format": 1,
            "checkpoint": os.path.abspath(cfg.load),
            "checkpoint_id": meta.checkpoint_id,
            "arch": arch.to_dict(),
            "num_samples": icfg.num_samples,
            "seq_length": seq,
            "default_agg": f"{icfg.seq_agg}-{icfg.batch_agg}",
            "data": list(cfg.data.train),
            "block_sizes": [int(b) for b in icfg.block_sizes],
            "user_metric": user,
            "calibration_loss": calib_loss,
            "fingerprint": fp,
        }
        fail_together(lambda: Scores(tensors, info).save(cfg.save), rank0_only=True)
    metrics = {
        "command": "importance",
        "save": cfg.save,
        "num_samples": icfg.num_samples,
        "calibration_loss": calib_loss,
        "seconds": round(time.time() - t0, 3),
    }
    emit_metrics(metrics, cfg.save)
    return metrics
