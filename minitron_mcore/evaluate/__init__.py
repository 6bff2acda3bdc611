"""``minitron evaluate``: validation loss and perplexity of a checkpoint.

    minitron evaluate load=runs/student data.valid=[data/valid] seq_length=512
    torchrun --nproc-per-node 2 -m minitron_mcore evaluate load=CKPT parallel.tp=2

The loss is the mean next-token cross entropy over ``iters`` fixed global batches (padded vocab
entries excluded). Metrics go to stdout (one JSON line) and ``save``/metrics.json.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from minitron_mcore.checkpoint.megatron import load_model, read_meta
from minitron_mcore.data.datasets import DataConfig, GlobalBatches, build_eval_dataset, require_data
from minitron_mcore.data.preprocess import resolve_tokenizer_path
from minitron_mcore.data.tokenizer import Tokenizer
from minitron_mcore.errors import require
from minitron_mcore.parallel import ParallelConfig, parallel_context
from minitron_mcore.stages.common import check_tokenizer_vocab, train_dtype
from minitron_mcore.train.loop import evaluate as eval_loss
from minitron_mcore.train.step import lm_forward_step
from minitron_mcore.utils.log import emit_metrics, log0


@dataclass
class EvaluateConfig:
    """``minitron evaluate``: LM loss / perplexity on held-out data."""

    load: str = ""
    """Checkpoint to evaluate."""
    save: str = ""
    """Directory for metrics.json; empty = ``<load>.eval``."""
    data: DataConfig = field(default_factory=DataConfig)
    """``data.valid`` (or, if empty, ``data.train``) is read."""
    seq_length: int = 256
    global_batch_size: int = 16
    micro_batch_size: int = 4
    iters: int = 8
    """Global batches to average over."""
    precision: str = "auto"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234


def evaluate(cfg: EvaluateConfig) -> dict:
    t0 = time.time()
    require_data(cfg.data, evaluation=True)
    meta = read_meta(cfg.load)
    meta.arch.check_parallel(cfg.parallel.tp, cfg.parallel.pp)
    require(
        0 < cfg.seq_length <= meta.arch.max_position_embeddings,
        f"seq_length={cfg.seq_length} exceeds the model's maximum sequence length "
        f"{meta.arch.max_position_embeddings}",
    )
    require(cfg.iters > 0, "iters must be positive")
    tok = Tokenizer(resolve_tokenizer_path(cfg.load))
    check_tokenizer_vocab(tok, meta.arch.vocab_size)
    with parallel_context(cfg.parallel, cfg.seed):
        from megatron.core import parallel_state as ps

        model, _ = load_model(cfg.load, train_dtype(cfg.precision))
        ds = build_eval_dataset(
            cfg.data, tok, cfg.seq_length, cfg.seed, cfg.iters * cfg.global_batch_size
        )
        gb = GlobalBatches(
            ds,
            cfg.global_batch_size,
            cfg.micro_batch_size,
            ps.get_data_parallel_rank(),
            ps.get_data_parallel_world_size(),
        )
        loss = eval_loss(
            model,
            lm_forward_step(meta.arch.vocab_size),
            [gb.get(i) for i in range(cfg.iters)],
            cfg.seq_length,
        )
    metrics = {
        "command": "evaluate",
        "load": cfg.load,
        "valid_loss": loss,
        "valid_ppl": math.exp(min(loss, 50.0)),
        "tokens": cfg.iters * cfg.global_batch_size * cfg.seq_length,
        "seconds": round(time.time() - t0, 3),
    }
    log0("evaluate: %s loss %.4f ppl %.2f", cfg.load, loss, metrics["valid_ppl"])
    emit_metrics(metrics, cfg.save or cfg.load.rstrip("/") + ".eval")
    return metrics
