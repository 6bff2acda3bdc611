"""``minitron preprocess``: text / JSONL -> Megatron indexed dataset (``PREFIX.bin/.idx``).

    minitron preprocess input=[corpus.jsonl] tokenizer=CKPT/tokenizer save=data/corpus
    minitron preprocess input=[a.txt,b.txt] text_mode=file tokenizer=tok.model save=data/ab

The work is :mod:`minitron_mcore.data.preprocess`'s; this entry checks the keys and names the
tokenizer (a checkpoint directory stands for the tokenizer stored in it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from minitron_mcore.checkpoint.layout import resolve_tokenizer_path
from minitron_mcore.data.preprocess import iter_documents, write_indexed
from minitron_mcore.errors import require
from minitron_mcore.utils.log import emit_metrics, log0


@dataclass
class PreprocessConfig:
    """``minitron preprocess``: tokenize text into a Megatron indexed dataset."""

    input: list = field(default_factory=list)
    """Input files: ``.jsonl`` (one JSON object per line) or plain text."""
    tokenizer: str = ""
    """Tokenizer directory (HF) or SentencePiece ``.model`` file; a checkpoint dir works too."""
    save: str = ""
    """Output prefix: writes ``save.bin``, ``save.idx`` and ``save.json``."""
    json_key: str = "text"
    """Field of each JSONL record that holds the text."""
    text_mode: str = "file"
    """Plain-text documents: ``file`` (a file is one document), ``line`` or ``paragraph``
    (split at blank lines)."""
    workers: int = 2
    """Tokenizer processes."""
    overwrite: bool = False
    """Replace existing ``save.bin/.idx``."""


def preprocess(cfg: PreprocessConfig) -> dict:
    t0 = time.time()
    require(len(cfg.input) > 0, "input= is empty; pass files, e.g. input=[corpus.jsonl]")
    for path in cfg.input:
        require(os.path.isfile(path), f"input file {path} does not exist")
    require(bool(cfg.save), "save= is empty; pass an output prefix, e.g. save=data/corpus")
    require(
        cfg.overwrite or not os.path.exists(cfg.save + ".bin"),
        f"{cfg.save}.bin already exists; choose another save= prefix or pass overwrite=true",
    )
    tokenizer = resolve_tokenizer_path(cfg.tokenizer)
    log0(
        "preprocess: %d file(s) -> %s.bin/.idx with %d worker(s)",
        len(cfg.input),
        cfg.save,
        cfg.workers,
    )
    docs = iter_documents(list(cfg.input), cfg.json_key, cfg.text_mode)
    info = write_indexed(docs, tokenizer, cfg.save, max(1, cfg.workers))
    metrics = {
        "command": "preprocess",
        "save": cfg.save,
        "seconds": round(time.time() - t0, 3),
        **{k: info[k] for k in ("documents", "tokens")},
    }
    emit_metrics(metrics, os.path.dirname(os.path.abspath(cfg.save)))
    return metrics
