"""``minitron preprocess``: text / JSONL -> Megatron indexed dataset (``PREFIX.bin/.idx``).

    minitron preprocess input=[corpus.jsonl] tokenizer=CKPT/tokenizer save=data/corpus
    minitron preprocess input=[a.txt,b.txt] text_mode=file tokenizer=tok.model save=data/ab

Each document is tokenized (in ``workers`` processes) and ends with the tokenizer's EOD token;
Megatron's ``IndexedDatasetBuilder`` writes the files. ``PREFIX.json`` records the tokenizer's
fingerprint so training can refuse data tokenized for a different model.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from minitron_mcore.errors import MinitronError, require
from minitron_mcore.utils.log import emit_metrics, human_count, log0, progress

TEXT_MODES = ("file", "line", "paragraph")
_POSTFIX_SECONDS = 1.0  # progress's token count / on_progress callback


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


def iter_documents(paths: list[str], json_key: str, text_mode: str) -> Iterator[str]:
    """Documents from JSONL / text files (empty documents are skipped)."""
    require(text_mode in TEXT_MODES, f"text_mode={text_mode!r}: use one of {TEXT_MODES}")
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise MinitronError(f"{path}:{n} is not valid JSON ({e.msg})") from e
                    require(
                        isinstance(rec, dict) and json_key in rec,
                        f"{path}:{n} has no key {json_key!r}; set json_key= to the text field",
                    )
                    if str(rec[json_key]).strip():
                        yield str(rec[json_key])
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text_mode == "file":
            parts = [text]
        elif text_mode == "line":
            parts = text.splitlines()
        else:
            parts = text.split("\n\n")
        yield from (p for p in parts if p.strip())


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    from minitron_mcore.data.tokenizer import Tokenizer

    _WORKER_TOKENIZER = Tokenizer(tokenizer_path)


def _encode(text: str) -> np.ndarray:
    ids = _WORKER_TOKENIZER.tokenize(text)
    ids.append(_WORKER_TOKENIZER.eod)
    return np.asarray(ids, dtype=np.int64)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def write_indexed(
    docs: Iterator[str],
    tokenizer_path: str,
    prefix: str,
    workers: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Tokenize ``docs`` and write ``prefix.bin/.idx`` atomically. Returns counts.

    Progress (documents, tokens, tokens/s) shows on rank 0 through :func:`progress`: a bar on a
    terminal, a log line a minute otherwise (the count has no total: the input is a stream);
    ``on_progress(documents, tokens)`` is called about once a second."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from minitron_mcore.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = prefix + ".partial"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=token_dtype(tok.vocab_size))
    n_docs = n_tokens = 0
    try:
        if workers > 1:
            pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_path,))
            encoded = pool.imap(_encode, docs, chunksize=16)
        else:
            _init_worker(tokenizer_path)
            pool, encoded = None, map(_encode, docs)
        bar = progress(encoded, desc="preprocess", unit="doc")
        start = last = time.monotonic()
        for ids in bar:
            builder.add_document(ids, [ids.size])
            n_docs += 1
            n_tokens += int(ids.size)
            now = time.monotonic()
            if now - last < _POSTFIX_SECONDS:
                continue
            last, rate = now, n_tokens / (now - start)
            bar.set_postfix_str(
                f"{human_count(n_tokens)} tokens, {human_count(rate)} tokens/s", refresh=False
            )
            if on_progress is not None:
                on_progress(n_docs, n_tokens)
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
        require(n_docs > 0, "the input holds no documents (all files empty?); nothing to write")
        builder.finalize(tmp + ".idx")
        seconds = time.monotonic() - start
        log0(
            "preprocess: %s documents, %s tokens in %.1f s (%s tokens/s)",
            human_count(n_docs),
            human_count(n_tokens),
            seconds,
            human_count(n_tokens / max(seconds, 1e-9)),
        )
    except BaseException:
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
        raise
    for ext in (".bin", ".idx"):
        os.replace(tmp + ext, prefix + ext)
    info = {
        "documents": n_docs,
        "tokens": n_tokens,
        "tokenizer": os.path.abspath(tokenizer_path),
        "tokenizer_fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size,
    }
    with open(prefix + ".json", "w") as f:
        json.dump(info, f, indent=2)
    return info


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


def resolve_tokenizer_path(path: str) -> str:
    """A checkpoint directory stands for its ``tokenizer/`` subdirectory."""
    from minitron_mcore.checkpoint.megatron import META_FILE, TOKENIZER_DIR, resolve_checkpoint

    if os.path.isfile(os.path.join(path, META_FILE)):
        return os.path.join(resolve_checkpoint(path), TOKENIZER_DIR)
    return path
