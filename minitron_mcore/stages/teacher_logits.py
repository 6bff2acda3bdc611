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
import os
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


def _rows_step(vocab: int, k: int, precision: str):
    """A forward-only step: the teacher's logits -> this micro-batch's rows, appended to
    ``step.rows`` (last pipeline stage)."""
    from megatron.core import parallel_state as ps

    def loss(output):
        tp_group = ps.get_tensor_model_parallel_group()
        b, s, part = output.shape
        start = ps.get_tensor_model_parallel_rank() * part
        ids, logp, tail = teacher_top_k(output.reshape(b * s, part), k, vocab, start, tp_group)
        step.rows.append(encode(ids, logp, tail, vocab, precision).reshape(b, s, -1))
        return output.new_zeros(()), torch.ones((), dtype=torch.int), {}

    def step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch["tokens"], batch["position_ids"], None), loss

    step.rows = []
    return step


def store_path(save: str, name: str) -> str:
    """Where the training ("train") and validation ("valid") predictions of ``save`` lie."""
    return save if name == "train" else os.path.join(save, name)


def _open_for_writing(save: str, stores: dict, overwrite: bool) -> dict:
    """Create (or find again) each store; ``{name: shards still missing}``."""
    out = {}
    for name, info in stores.items():
        out[name] = LogitStore.create(store_path(save, name), info, overwrite).missing()
    return out


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
    stores = {
        "train": StoreInfo(
            fp, opts.top_k, opts.precision, tok.vocab_size, t.seq_length, samples, per
        )
    }
    if t.eval_iters > 0:  # the validation batches the run evaluates on, by their positions
        stores["valid"] = dataclasses.replace(stores["train"], samples=t.eval_iters * gbs)
    # made (or found again, for a resumed run) by rank 0, its answer shared
    missing = rank0_decides(lambda: _open_for_writing(cfg.save, stores, cfg.overwrite))
    with parallel_context(cfg.parallel, cfg.seed):
        from megatron.core import parallel_state as ps

        dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        require(per % t.micro_batch_size == 0, "train.micro_batch_size must divide the batch")
        model, _ = load_model(cfg.load)
        model.eval()
        datasets = build_datasets(
            cfg.data,
            tok,
            t.seq_length,
            cfg.seed,
            train_samples=samples,
            valid_samples=t.eval_iters * gbs,
        )
        writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        log0(
            "teacher-logits: %d samples x %d tokens, top-%d (%s, %d bytes/token), %d of %d "
            "shards to compute",
            samples,
            t.seq_length,
            opts.top_k,
            opts.precision,
            stores["train"].row_bytes,
            len(missing["train"]),
            stores["train"].num_shards,
        )
        for (name, info), ds in zip(stores.items(), datasets):
            store = LogitStore(store_path(cfg.save, name), info)
            mine = [i for i in missing[name] if i % dp == dpr]  # replicas take turns
            step = _rows_step(tok.vocab_size, opts.top_k, opts.precision)
            for i in progress(mine, f"teacher-logits ({name})", unit="shard"):
                first, n = i * per, info.shard_shape(i)[0]
                mbs = t.micro_batch_size
                batches = [
                    collate([ds[(first + j + a) % len(ds)] for a in range(mbs)])
                    for j in range(0, n, mbs)
                ]
                step.rows.clear()
                with torch.no_grad():
                    run_schedule(model, step, batches, t.seq_length, True)
                if writer:
                    store.write_shard(i, np.concatenate(step.rows))
        fail_together(lambda: None)  # every replica's shards are written before anyone reports
    tokens = samples * t.seq_length
    metrics = {
        "command": "teacher-logits",
        "save": cfg.save,
        "samples": samples,
        "tokens": tokens,
        "top_k": opts.top_k,
        "precision": opts.precision,
        "bytes_per_token": stores["train"].row_bytes,
        "shards_computed": sum(len(m) for m in missing.values()),
        "seconds": round(time.time() - t0, 3),
    }
    emit_metrics(metrics, cfg.save)
    return metrics


def open_stores(path: str, teacher: str, data: DataConfig, train: TrainConfig, seed: int):
    """The stored predictions a distillation run (``distill teacher_logits=``) reads: (train
    store, validation store or None), refused in one line when they were computed for another
    teacher, data or sample order than this run's."""
    store = LogitStore.open(path)
    info = store.info
    want = logits_fingerprint(
        teacher,
        data,
        train.seq_length,
        train.steps * train.global_batch_size,
        seed,
        info.k,
        info.precision,
    )
    require(
        info.fingerprint == want and info.samples == train.steps * train.global_batch_size,
        f"teacher_logits={path} were computed for another teacher, data or sample order than "
        "this run's; run `minitron teacher-logits` with this run's teacher=, data.*, "
        "train.steps/seq_length/global_batch_size and seed",
    )
    valid = None
    if train.eval_iters > 0:
        valid = LogitStore.open(store_path(path, "valid"), info.fingerprint)
        require(
            valid.info.samples >= train.eval_iters * train.global_batch_size,
            f"teacher_logits={path} cover fewer validation batches than train.eval_iters",
        )
    return store, valid
