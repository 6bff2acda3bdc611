"""``minitron evaluate``: validation loss and perplexity of a checkpoint.

    minitron evaluate load=runs/student data.valid=[data/valid] seq_length=512
    torchrun --nproc-per-node 2 -m minitron_mcore evaluate load=CKPT parallel.tp=2
    minitron evaluate load=CKPT lm_eval_tasks=[minitron_stdlib_mc] \\
        lm_eval_include=[examples/lm_eval_tasks]

The loss is the mean next-token cross entropy over ``iters`` fixed global batches (padded vocab
entries excluded). With ``lm_eval_tasks`` the same loaded model is also scored on
lm-evaluation-harness tasks (:mod:`.lm_eval_run`, :mod:`.lm_eval_adapter`); without data the
loss is then skipped. Metrics go to stdout (one JSON line) and ``save``/metrics.json.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

from minitron_mcore.checkpoint.layout import resolve_tokenizer_path
from minitron_mcore.checkpoint.megatron import load_model, read_meta
from minitron_mcore.data.datasets import DataConfig, GlobalBatches, build_eval_dataset, require_data
from minitron_mcore.data.tokenizer import Tokenizer, check_tokenizer_vocab
from minitron_mcore.errors import require
from minitron_mcore.models.build import train_dtype
from minitron_mcore.parallel import ParallelConfig, parallel_context
from minitron_mcore.train.loop import evaluate as eval_loss
from minitron_mcore.train.step import lm_forward_step
from minitron_mcore.utils.log import emit_metrics, log0, progress


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
    held_out: bool = False
    """Without ``data.valid``: score only the validation share of ``data.train`` under
    ``data.split`` (the documents training held out) instead of all of it."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks / groups to score as well, e.g. ``[hellaswag,arc_easy]``
    (needs ``pip install -e .[eval]``); scores go to ``metrics["lm_eval"][task][metric]``."""
    lm_eval_include: list[str] = field(default_factory=list)
    """Directories of extra task YAMLs (lm-eval's ``--include_path``), e.g.
    ``[examples/lm_eval_tasks]``."""
    lm_eval_limit: Optional[float] = None
    """Documents per task (a fraction of each task when < 1); null = all."""
    lm_eval_num_fewshot: Optional[int] = None
    """Few-shot examples per prompt; null = each task's default."""
    lm_eval_batch_size: int = 16
    """Requests per forward pass (also capped at 4096 padded tokens)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 1234


def evaluate(cfg: EvaluateConfig) -> dict:
    t0 = time.time()
    with_loss = not cfg.lm_eval_tasks or bool(cfg.data.valid or cfg.data.train)
    if with_loss:
        require_data(cfg.data, evaluation=True)
    tasks = None
    if cfg.lm_eval_tasks:
        from minitron_mcore.evaluate.lm_eval_run import task_manager

        tasks = task_manager(cfg.lm_eval_tasks, cfg.lm_eval_include)  # fail before loading
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
    metrics = {"command": "evaluate", "load": cfg.load}
    with parallel_context(cfg.parallel, cfg.seed):
        model, _ = load_model(cfg.load, train_dtype(cfg.precision))
        if with_loss:
            metrics.update(_valid_loss(cfg, model, meta, tok))
        if tasks is not None:
            metrics["lm_eval"] = _lm_eval(cfg, model, meta, tasks)
    metrics["seconds"] = round(time.time() - t0, 3)
    emit_metrics(metrics, cfg.save or cfg.load.rstrip("/") + ".eval")
    return metrics


def _valid_loss(cfg: EvaluateConfig, model, meta, tok) -> dict:
    from megatron.core import parallel_state as ps

    ds = build_eval_dataset(
        cfg.data,
        tok,
        cfg.seq_length,
        cfg.seed,
        cfg.iters * cfg.global_batch_size,
        held_out=cfg.held_out,
    )
    gb = GlobalBatches(
        ds,
        cfg.global_batch_size,
        cfg.micro_batch_size,
        ps.get_data_parallel_rank(),
        ps.get_data_parallel_world_size(),
    )
    lazy = (gb.get(i) for i in range(cfg.iters))  # progress follows the forward passes
    loss = eval_loss(
        model,
        lm_forward_step(meta.arch.vocab_size),
        progress(lazy, "validation", cfg.iters, unit="batch"),
        cfg.seq_length,
    )
    ppl = math.exp(min(loss, 50.0))
    log0("evaluate: %s loss %.4f ppl %.2f", cfg.load, loss, ppl)
    return {
        "valid_loss": loss,
        "valid_ppl": ppl,
        "tokens": cfg.iters * cfg.global_batch_size * cfg.seq_length,
    }


def _lm_eval(cfg: EvaluateConfig, model, meta, tasks) -> dict:
    """The loaded model through the ``minitron`` lm-eval adapter: {task: {metric: value}}."""
    from minitron_mcore.evaluate.lm_eval_adapter import MinitronLM
    from minitron_mcore.evaluate.lm_eval_run import run_lm_eval

    lm = MinitronLM.from_loaded(
        model, meta, resolve_tokenizer_path(cfg.load), batch_size=cfg.lm_eval_batch_size
    )
    scores = run_lm_eval(
        lm, tasks, cfg.lm_eval_tasks, cfg.lm_eval_limit, cfg.lm_eval_num_fewshot, cfg.seed
    )
    for task, res in scores.items():
        log0("evaluate: lm-eval %s %s", task, res)
    return scores
