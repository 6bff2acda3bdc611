"""``minitron prune``: checkpoint + importance scores + target -> a smaller checkpoint.

    minitron prune load=CKPT scores=SCORES save=PRUNED prune.target.hidden_size=3072 \\
        prune.target.ffn_hidden_size=9216
    minitron prune load=CKPT scores=SCORES save=PRUNED prune.target.num_layers=16
    torchrun --nproc-per-node 4 -m minitron_mcore prune ... parallel.tp=2 parallel.pp=2

Layers are processed one at a time: the source layer is gathered from its TP shards (one global
layer in memory), sliced by the pure functions of ``prune.slicing``, sent to the pipeline stage
that owns it in the pruned model, copied into that model's shards, and its source copy is freed.
Peak memory is about one copy of the model plus one layer. The plan (kept indices per axis,
dropped layers, the old->new layer map, the scores' provenance) is stored in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from minitron_mcore.checkpoint import hf_mapping
from minitron_mcore.checkpoint.megatron import (
    copy_into_shards,
    gather_shards,
    load_model,
    read_meta,
    save_checkpoint,
    shards_by_layer,
    tokenizer_files_of,
)
from minitron_mcore.errors import require
from minitron_mcore.importance.scores import Scores
from minitron_mcore.models.build import build_model_for_stage, resolve_dtype
from minitron_mcore.parallel import ParallelConfig, comm_device, parallel_context
from minitron_mcore.prune.plan import PruneConfig, PrunePlan, make_plan
from minitron_mcore.prune.slicing import prune_global, prune_layer
from minitron_mcore.utils.log import emit_metrics, human_count, log0, progress


@dataclass
class PruneCommandConfig:
    """``minitron prune``: structured width / depth pruning."""

    load: str = ""
    scores: str = ""
    """Directory written by ``minitron importance`` for this checkpoint (not needed for
    ``prune.drop_layers`` alone)."""
    save: str = ""
    prune: PruneConfig = field(default_factory=PruneConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234
    overwrite: bool = False


def _check_scores(scores: Scores, meta, path: str, load: str) -> None:
    same_id = scores.info.get("checkpoint_id") == meta.checkpoint_id and meta.checkpoint_id
    require(
        bool(same_id) and scores.info.get("arch") == meta.arch.to_dict(),
        f"scores={path} were computed on a different checkpoint "
        f"({scores.info.get('checkpoint')}); run `minitron importance load={load}` first",
    )


def _free(module) -> None:
    for p in module.parameters():
        p.data = torch.empty(0, dtype=p.dtype)


def _transfer(tensors, shapes: dict, dtype, src_rank: int, dst_rank: int, me: int):
    """Send a pruned layer between pipeline stages (same TP/DP coordinates)."""
    if src_rank == dst_rank:
        return tensors
    device = comm_device()  # NCCL sends GPU tensors only
    if me == src_rank:
        for k in sorted(shapes):
            dist.send(tensors[k].to(device).contiguous(), dst_rank)
        return None
    out = {}
    for k in sorted(shapes):
        out[k] = torch.empty(shapes[k], dtype=dtype, device=device)
        dist.recv(out[k], src_rank)
    return out


@torch.no_grad()
def apply_plan(src_model, dst_model, plan: PrunePlan, dtype) -> None:
    """Move every kept, sliced layer from ``src_model`` into ``dst_model`` (collective)."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    stage = ps.get_pipeline_model_parallel_rank()
    stage_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    src_shards, dst_shards = shards_by_layer(src_model), shards_by_layer(dst_model)
    src_layers = {layer.layer_number - 1: layer for layer in src_model.decoder.layers}
    per_src, per_dst = plan.src.num_layers // pp, plan.dst.num_layers // pp
    shapes = hf_mapping.layer_shapes(plan.dst)
    me = dist.get_rank()
    for i in set(src_layers) - set(plan.kept_layers):  # dropped layers: free them up front
        src_shards.pop(i, None)
        _free(src_layers[i])
    for j, i in enumerate(progress(plan.kept_layers, desc="prune", unit="layer")):
        s_src, s_dst = i // per_src, j // per_dst
        pruned = None
        if stage == s_src:
            canon = gather_shards(src_shards.pop(i))
            pruned = prune_layer(
                canon, plan.layers[j], plan.src.num_query_groups, plan.src.kv_channels, plan.hidden
            )
            del canon
            _free(src_layers[i])
        if stage in (s_src, s_dst):
            pruned = _transfer(pruned, shapes, dtype, stage_ranks[s_src], stage_ranks[s_dst], me)
        if stage == s_dst:
            copy_into_shards(dst_shards[j], pruned)
    if None in src_shards:  # embeddings / final norm / output layer live on this stage
        canon = gather_shards(src_shards.pop(None))
        _free(src_model)  # only the gathered copy is needed from here on
        copy_into_shards(dst_shards[None], prune_global(canon, plan.hidden))


def prune(cfg: PruneCommandConfig) -> dict:
    t0 = time.time()
    meta = read_meta(cfg.load)
    require(bool(cfg.save), "save= is empty; pass an output directory for the pruned model")
    require(
        cfg.overwrite or not os.path.exists(cfg.save),
        f"save={cfg.save} already exists; choose a new directory or pass overwrite=true",
    )
    scores = None
    if cfg.scores:
        scores = Scores.load(cfg.scores)
        _check_scores(scores, meta, cfg.scores, cfg.load)
    plan = make_plan(meta.arch, cfg.prune, scores)
    for arch, what in ((meta.arch, "source"), (plan.dst, "pruned")):
        try:
            arch.check_parallel(cfg.parallel.tp, cfg.parallel.pp)
        except Exception as e:
            raise type(e)(f"{e} (the {what} model)") from e
    dtype = resolve_dtype(meta.dtype)
    with parallel_context(cfg.parallel, cfg.seed):
        log0(
            "prune: %s (%s params) -> %s params; layers kept %s",
            cfg.load,
            human_count(meta.arch.num_params()),
            human_count(plan.dst.num_params()),
            plan.kept_layers,
        )
        src_model, _ = load_model(cfg.load, dtype, use_te=False, perform_initialization=False)
        dst_model = build_model_for_stage(
            plan.dst, dtype, use_te=False, perform_initialization=False
        )
        apply_plan(src_model, dst_model, plan, dtype)
        del src_model
        record = dict(
            plan.to_dict(),
            scores=cfg.scores and os.path.abspath(cfg.scores),
            scores_agg=(cfg.prune.agg or (scores.default_agg if scores else None)),
            source_checkpoint=os.path.abspath(cfg.load),
        )
        new_meta = dataclasses.replace(meta, arch=plan.dst, prune_plan=record, train_state=None)
        new_meta = new_meta.with_step(
            "prune", source=os.path.abspath(cfg.load), target=dataclasses.asdict(cfg.prune.target)
        )
        save_checkpoint(dst_model, cfg.save, new_meta, tokenizer_files_of(cfg.load))
    metrics = {
        "command": "prune",
        "save": cfg.save,
        "params_before": meta.arch.num_params(),
        "params_after": plan.dst.num_params(),
        "kept_layers": plan.kept_layers,
        "arch": plan.dst.to_dict(),
        "seconds": round(time.time() - t0, 3),
    }
    emit_metrics(metrics, cfg.save)
    return metrics
