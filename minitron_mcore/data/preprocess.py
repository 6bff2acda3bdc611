"""Text / JSONL -> Megatron indexed dataset (``PREFIX.bin/.idx``); the command is
``minitron preprocess`` (:mod:`minitron_mcore.stages.preprocess`).

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

import numpy as np

from minitron_mcore.errors import MinitronError, require
from minitron_mcore.utils.log import human_count, log0, progress

TEXT_MODES = ("file", "line", "paragraph")
_POSTFIX_SECONDS = 1.0  # progress's token count / on_progress callback


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
