"""``minitron pretrain``: train a model of a family from scratch.

    minitron pretrain model=tiny-llama tokenizer=TOK_DIR save=runs/base train.steps=200
    torchrun --nproc-per-node 2 -m minitron_mcore pretrain model=tiny-llama tokenizer=TOK \\
        save=runs/base parallel.tp=2

The biggest model of a family is trained once; smaller ones are then pruned and distilled from
it. ``model.vocab_size`` is set to the tokenizer's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minitron_mcore.checkpoint.layout import resolve_tokenizer_path
from minitron_mcore.checkpoint.megatron import CheckpointMeta
from minitron_mcore.data.datasets import require_data
from minitron_mcore.data.tokenizer import Tokenizer
from minitron_mcore.errors import require
from minitron_mcore.models.arch import ModelArch
from minitron_mcore.models.build import build_model_for_stage, dtype_name, train_dtype
from minitron_mcore.parallel import parallel_context
from minitron_mcore.stages.common import (
    TrainingRunKeys,
    check_room_for_checkpoint,
    finished_run,
    train_job,
)
from minitron_mcore.train import fast_paths
from minitron_mcore.train.config import resolve_train_config
from minitron_mcore.train.loop import run_training
from minitron_mcore.train.resume import plan_resume, run_signature
from minitron_mcore.utils.log import emit_metrics, human_count, log0


@dataclass
class PretrainConfig(TrainingRunKeys):
    """``minitron pretrain``: a new model trained from random initialisation."""

    save: str = ""
    """Output checkpoint directory (resumed automatically if it holds this run's state)."""
    tokenizer: str = ""
    """Tokenizer directory / SentencePiece .model (stored with the checkpoint)."""
    model: ModelArch = field(default_factory=ModelArch)
    """Model shape; pick a preset with ``model=<name>`` (conf/model/)."""


def pretrain(cfg: PretrainConfig) -> dict:
    require(bool(cfg.save), "save= is empty; pass an output directory, e.g. save=runs/base")
    require_data(cfg.data)
    tok_path = resolve_tokenizer_path(cfg.tokenizer)
    require(bool(tok_path), "tokenizer= is empty; pass a tokenizer directory or .model file")
    tokenizer = Tokenizer(tok_path)
    arch = cfg.model.replace(vocab_size=tokenizer.vocab_size)
    arch.check_parallel(cfg.parallel.tp, cfg.parallel.pp)
    train = resolve_train_config(cfg.train, arch.max_position_embeddings, cfg.parallel)
    dtype = train_dtype(train.precision)
    signature = run_signature(
        "pretrain",
        train,
        cfg.data,
        cfg.seed,
        dtype_name(dtype),
        model=arch.to_dict(),
        tokenizer=tokenizer.fingerprint(),
    )
    plan = plan_resume(cfg.save, cfg.resume, cfg.overwrite, signature, cfg.resume_override)
    if plan.finished:
        return finished_run(plan, cfg.save)
    check_room_for_checkpoint(cfg.save, arch)
    with parallel_context(cfg.parallel, cfg.seed):
        log0(
            "pretrain: %s model (%s params), %d steps x %d samples x %d tokens",
            arch.family,
            human_count(arch.num_params()),
            train.steps,
            train.global_batch_size,
            train.seq_length,
        )
        model = build_model_for_stage(
            arch,
            dtype,
            **fast_paths.model_kwargs(train, cfg.parallel),
        )
        meta = CheckpointMeta(arch=arch, dtype=dtype_name(dtype))
        job = train_job("pretrain", cfg, plan, signature, model, meta, tokenizer, train)
        metrics = run_training(job)
    emit_metrics(metrics, cfg.save)
    return metrics
