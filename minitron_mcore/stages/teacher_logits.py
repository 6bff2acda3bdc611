"""``minitron teacher-logits``: the teacher's top-k predictions over the distillation data, once,
in the order a distillation run will read its samples.

    minitron teacher-logits load=TEACHER save=LOGITS data.train=[DATA] train.steps=1000 \\
        train.seq_length=4096 train.global_batch_size=256 distill.top_k=64
    torchrun --nproc-per-node 8 -m minitron_mcore teacher-logits ... parallel.tp=2 parallel.pp=2

The sample order is the distillation run's: the same ``data.*``, ``train.steps``,
``train.seq_length``, ``train.global_batch_size`` and ``seed`` build the same shuffled Megatron
dataset, whose sample at position ``p`` the run reads as the ``p``-th sample it consumes
(``data.GlobalBatches``). Each position's rows (``distill.topk_codec``) land in the shard of
that position (``distill.logit_store``); data-parallel replicas take whole shards in turn, and
within a replica the last pipeline stage's first tensor-parallel rank writes them (every TP
rank holds the same top-k after ``teacher_top_k``'s collectives). Killed, it is re-run with the
same keys and computes only the missing shards.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from minitron_mcore.checkpoint.layout import resolve_tokenizer_path
from minitron_mcore.checkpoint.megatron import load_model, read_meta
from minitron_mcore.checkpoint.rerun import fingerprint
from minitron_mcore.data.datasets import DataConfig, build_datasets, collate, require_data
from minitron_mcore.data.tokenizer import Tokenizer, check_tokenizer_vocab
from minitron_mcore.distill.logit_store import LogitStore, StoreInfo
from minitron_mcore.distill.offline import teacher_top_k
from minitron_mcore.distill.topk_codec import PRECISIONS, encode
from minitron_mcore.errors import require
from minitron_mcore.parallel import ParallelConfig, fail_together, parallel_context, rank0_decides
from minitron_mcore.train.config import TrainConfig
from minitron_mcore.train.step import run_schedule
from minitron_mcore.utils.log import emit_metrics, log0, progress


@dataclass
class StoredKD:
    """``distill.*`` of ``teacher-logits``: what is stored per token."""

    top_k: int = 64
    """The teacher's k most likely tokens (with the log-mass of the rest)."""
    precision: str = "bf16"
    """Log-probabilities as bf16 or int8 (8-bit gaps to the top-1: ~60 bytes less per token at
    k = 64)."""
    shard_samples: int = 256
    """Samples per shard (rounded up to a multiple of train.global_batch_size)."""


@dataclass
class TeacherLogitsConfig:
    """``minitron teacher-logits``: store a teacher's top-k predictions for a distillation run."""

    load: str = ""
    """The teacher checkpoint."""
    save: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    """The distillation run's data keys (they fix the sample order)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The distillation run's ``steps``, ``seq_length``, ``global_batch_size`` (and
    ``micro_batch_size`` for the teacher's passes here); its learning rate is not read."""
    distill: StoredKD = field(default_factory=StoredKD)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234
    overwrite: bool = False


@dataclass
class _Order:
    """What fixes the sample order and the stored values (the store's fingerprint)."""

    data: DataConfig
    seq_length: int
    samples: int
    seed: int
    top_k: int
    precision: str


def logits_fingerprint(
    teacher: str, data: DataConfig, seq: int, samples: int, seed: int, top_k: int, precision: str
) -> str:
    """The fingerprint ``teacher-logits`` writes and ``distill teacher_logits=`` expects."""
    # the data paths by identity (inputs), not as strings that differ with the working directory
    keys = _Order(
        dataclasses.replace(data, train=[], valid=[]), seq, samples, seed, top_k, precision
    )
    inputs = {"teacher": teacher, "data.train": list(data.train), "data.valid": list(data.valid)}
    return fingerprint("teacher-logits", keys, inputs)


def _rows_step(vocab: int, k: int, precision: str, out: list):
    """A forward-only step: the teacher's logits -> this micro-batch's rows, appended to
    ``out`` (last pipeline stage)."""
    from megatron.core import parallel_state as ps

    def loss(output):
        tp_group = ps.get_tensor_model_parallel_group()
        b, s, part = output.shape
        start = ps.get_tensor_model_parallel_rank() * part
        ids, logp, tail = teacher_top_k(output.reshape(b * s, part), k, vocab, start, tp_group)
        out.append(encode(ids, logp, tail, vocab, precision).reshape(b, s, -1))
        zero = output.new_zeros(())
        return zero, torch.ones((), dtype=torch.int), {}

    def step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch["tokens"], batch["position_ids"], None), loss

    return step


def teacher_logits(cfg: TeacherLogitsConfig) -> dict:
    t0 = time.time()
    require(bool(cfg.load), "load= is empty; pass the teacher checkpoint")
    require(bool(cfg.save), "save= is empty; pass an output directory for the predictions")
    require_data(cfg.data)
    meta = read_meta(cfg.load)
    arch, t, opts = meta.arch, cfg.train, cfg.distill
    require(opts.precision in PRECISIONS, f"distill.precision must be one of {PRECISIONS}")
    require(
        t.steps > 0 and t.global_batch_size and t.global_batch_size > 0,
        "train.steps and train.global_batch_size (the distillation run's) must be positive",
    )
    require(
        0 < t.seq_length <= arch.max_position_embeddings,
        f"train.seq_length={t.seq_length} exceeds the teacher's maximum sequence length",
    )
    arch.check_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    tok = Tokenizer(resolve_tokenizer_path(cfg.load))
    check_tokenizer_vocab(tok, arch.vocab_size)
    require(0 < opts.top_k <= tok.vocab_size, f"distill.top_k must be in 1..{tok.vocab_size}")
    gbs = t.global_batch_size
    samples = t.steps * gbs
    per = -(-max(1, opts.shard_samples) // gbs) * gbs
    fp = logits_fingerprint(
        cfg.load, cfg.data, t.seq_length, samples, cfg.seed, opts.top_k, opts.precision
    )
    info = StoreInfo(fp, opts.top_k, opts.precision, tok.vocab_size, t.seq_length, samples, per)
    # made (or found again, for a resumed run) by rank 0, its answer shared
    rank0_decides(lambda: LogitStore.create(cfg.save, info, cfg.overwrite).info)
    store = LogitStore(cfg.save, info)
    missing = rank0_decides(store.missing)
    with parallel_context(cfg.parallel, cfg.seed):
        from megatron.core import parallel_state as ps

        dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mbs = t.micro_batch_size
        require(per % mbs == 0, "train.micro_batch_size must divide train.global_batch_size")
        model, _ = load_model(cfg.load)
        model.eval()
        train_ds, _ = build_datasets(
            cfg.data,
            tok,
            t.seq_length,
            cfg.seed,
            train_samples=samples,
            valid_samples=t.eval_iters * gbs,
        )
        mine = [i for i in missing if i % dp == dpr]
        writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        log0(
            "teacher-logits: %d samples x %d tokens, top-%d (%s, %d bytes/token), %d of %d "
            "shards to compute",
            samples,
            t.seq_length,
            opts.top_k,
            opts.precision,
            info.row_bytes,
            len(missing),
            info.num_shards,
        )
        for i in progress(mine, "teacher-logits", unit="shard"):
            n = info.shard_shape(i)[0]
            first = i * per
            batches = [
                collate([train_ds[(first + j + a) % len(train_ds)] for a in range(mbs)])
                for j in range(0, n, mbs)
            ]
            rows: list = []
            with torch.no_grad():
                run_schedule(
                    model,
                    _rows_step(tok.vocab_size, opts.top_k, opts.precision, rows),
                    batches,
                    t.seq_length,
                    True,
                )
            if writer:
                store.write_shard(i, np.concatenate(rows))
        fail_together(lambda: None)  # every replica's shards are written before anyone reports
    tokens = samples * t.seq_length
    metrics = {
        "command": "teacher-logits",
        "save": cfg.save,
        "samples": samples,
        "tokens": tokens,
        "top_k": opts.top_k,
        "precision": opts.precision,
        "bytes_per_token": info.row_bytes,
        "shards_computed": len(missing),
        "seconds": round(time.time() - t0, 3),
    }
    emit_metrics(metrics, cfg.save)
    return metrics
