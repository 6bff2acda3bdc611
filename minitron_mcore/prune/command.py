"""``minitron prune``: checkpoint + importance scores + target -> a smaller checkpoint.

    minitron prune load=CKPT scores=SCORES save=PRUNED prune.target.hidden_size=3072 \\
        prune.target.ffn_hidden_size=9216
    minitron prune load=CKPT scores=SCORES save=PRUNED prune.target.num_layers=16
    torchrun --nproc-per-node 4 -m minitron_mcore prune ... parallel.tp=2 parallel.pp=2

The source model is never built: each rank builds its shard of the pruned model only, and for
each of its layers reads the kept source layer straight from the checkpoint files (one global
layer in memory, whatever TP/PP the source was saved with), slices it with the pure functions of
``prune.slicing`` and copies the slice into its shards. Peak memory is the pruned model's shard
plus one source layer (plus what the final save copies). The plan (kept indices per axis,
dropped layers, the old->new layer map, the scores' provenance) is stored in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch

from minitron_mcore.checkpoint.megatron import (
    WeightsReader,
    copy_into_shards,
    read_meta,
    save_checkpoint,
    shards_by_layer,
    tokenizer_files_of,
)
from minitron_mcore.checkpoint.rerun import already_done, checkpoint_fingerprint, fingerprint
from minitron_mcore.errors import require
from minitron_mcore.importance.scores import Scores
from minitron_mcore.models import canonical
from minitron_mcore.models.build import build_model_for_stage, resolve_dtype
from minitron_mcore.parallel import ParallelConfig, parallel_context
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


@torch.no_grad()
def apply_plan(reader: WeightsReader, dst_model, plan: PrunePlan) -> None:
    """Fill this rank's shards of the pruned model, one kept source layer at a time."""
    dst_shards = shards_by_layer(dst_model)
    src_keys = canonical.layer_keys(plan.src)
    mine = sorted(j for j in dst_shards if j is not None)  # this stage's layers of the new model
    for j in progress(mine, desc="prune", unit="layer"):
        canon = reader.read(src_keys, layer=plan.kept_layers[j])
        pruned = prune_layer(
            canon, plan.layers[j], plan.src.num_query_groups, plan.src.kv_channels, plan.hidden
        )
        del canon
        copy_into_shards(dst_shards.pop(j), pruned)
    rest = dst_shards.pop(None, [])  # embeddings / final norm / output layer of this stage
    keys = canonical.global_keys(plan.src)
    extra = sorted({sh.key for sh in rest} - set(keys))
    require(not extra, f"no pruning rule for {extra}; this model layout is not supported")
    for key in keys:  # one at a time: the embedding and output layer are the largest tensors
        shards = [sh for sh in rest if sh.key == key]
        if shards:
            copy_into_shards(shards, prune_global(reader.read([key]), plan.hidden))


def prune(cfg: PruneCommandConfig) -> dict:
    t0 = time.time()
    meta = read_meta(cfg.load)
    require(bool(cfg.save), "save= is empty; pass an output directory for the pruned model")
    fp = fingerprint("prune", cfg, {"load": cfg.load, "scores": cfg.scores})
    done = already_done("prune", cfg.save, cfg.overwrite, fp, checkpoint_fingerprint)
    if done:
        emit_metrics(done, cfg.save)
        return done
    scores = None
    if cfg.scores:
        scores = Scores.load(cfg.scores)
        _check_scores(scores, meta, cfg.scores, cfg.load)
    # before any weight is read: a target export-hf could not write is refused here
    plan = make_plan(meta.arch, cfg.prune, scores, meta.hf_config, cfg.parallel.tp)
    try:  # only the pruned model is built; the source is read layer by layer at any layout
        plan.dst.check_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    except Exception as e:
        raise type(e)(f"{e} (the pruned model)") from e
    dtype = resolve_dtype(meta.dtype)
    with parallel_context(cfg.parallel, cfg.seed):
        log0(
            "prune: %s (%s params) -> %s params; layers kept %s",
            cfg.load,
            human_count(meta.arch.num_params()),
            human_count(plan.dst.num_params()),
            plan.kept_layers,
        )
        reader = WeightsReader(cfg.load)
        dst_model = build_model_for_stage(plan.dst, dtype, perform_initialization=False)
        apply_plan(reader, dst_model, plan)
        record = dict(
            plan.to_dict(),
            scores=cfg.scores and os.path.abspath(cfg.scores),
            scores_agg=(cfg.prune.agg or (scores.default_agg if scores else None)),
            source_checkpoint=os.path.abspath(cfg.load),
            source_checkpoint_id=meta.checkpoint_id,
        )
        new_meta = dataclasses.replace(meta, arch=plan.dst, prune_plan=record, train_state=None)
        new_meta = new_meta.with_step(
            "prune",
            source=os.path.abspath(cfg.load),
            target=dataclasses.asdict(cfg.prune.target),
            fingerprint=fp,
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
