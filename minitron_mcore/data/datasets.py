"""Training / validation data: blends of indexed datasets through Megatron's
``BlendedMegatronDatasetBuilder`` + ``GPTDataset``, and deterministic global batches.

``data.train`` / ``data.valid`` entries are any of:

* an indexed-dataset prefix (``data/corpus`` for ``data/corpus.bin/.idx``);
* a blend ``[0.7, data/a, 0.3, data/b]`` (weights then prefixes);
* a text or JSONL file, tokenized on first use with the model's tokenizer into ``data.cache_dir``;
* ``demo:stdlib-code`` / ``demo:stdlib-docs`` - the built-in corpora (no download).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from minitron_mcore.data.tokenizer import Tokenizer
from minitron_mcore.errors import MinitronError, require
from minitron_mcore.utils.log import log0


@dataclass
class DataConfig:
    """Where training and validation tokens come from."""

    train: list = field(default_factory=lambda: ["demo:stdlib-code"])
    """Training data: prefixes, a weighted blend ``[w1, p1, w2, p2]``, text/JSONL files or
    ``demo:<name>``."""
    valid: list = field(default_factory=list)
    """Validation data (same forms). Empty: a held-out split of ``train`` (see ``split``)."""
    split: str = "95,5,0"
    """train/valid/test proportions used when ``valid`` is empty."""
    cache_dir: str = "runs/data"
    """Where text files and demo corpora are tokenized to, and Megatron's index cache."""
    json_key: str = "text"
    """Text field of JSONL records."""
    text_mode: str = "file"
    """How plain-text files split into documents: file, line or paragraph."""
    preprocess_workers: int = 2
    """Tokenizer processes for on-the-fly preprocessing."""


def _is_prefix(p: str) -> bool:
    return os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")


def _cached_prefix(source: str, tok: Tokenizer, cfg: DataConfig) -> str:
    """Tokenize a text/JSONL file (or demo corpus) once per tokenizer into the cache."""
    from minitron_mcore.data.demo import write_demo
    from minitron_mcore.data.preprocess import iter_documents, write_indexed
    from minitron_mcore.parallel import barrier, is_rank0

    if source.startswith("demo:"):
        demo_dir = os.path.join(cfg.cache_dir, "demo")
        if is_rank0():  # one writer; the others read the finished file after the barrier
            write_demo(source[5:], demo_dir)
        barrier()
        source = write_demo(source[5:], demo_dir)
    stat = os.stat(source)
    key = hashlib.sha256(
        f"{os.path.abspath(source)}|{stat.st_size}|{stat.st_mtime_ns}|{cfg.json_key}|"
        f"{cfg.text_mode}".encode()
    ).hexdigest()[:10]
    name = os.path.splitext(os.path.basename(source))[0]
    prefix = os.path.join(cfg.cache_dir, f"{name}-{key}-{tok.fingerprint()}")
    # Rank 0 alone decides and writes; every rank reaches the barrier (a rank that saw the
    # finished files early and returned would leave the others waiting forever).
    if is_rank0() and not _is_prefix(prefix):
        log0("tokenizing %s -> %s", source, prefix)
        docs = iter_documents([source], cfg.json_key, cfg.text_mode)
        write_indexed(docs, tok.path, prefix, cfg.preprocess_workers)
    barrier()
    return prefix


def _check_prefix_tokenizer(prefix: str, tok: Tokenizer) -> None:
    sidecar = prefix + ".json"
    if not os.path.isfile(sidecar):
        return  # prepared by another tool: nothing recorded to compare against
    with open(sidecar) as f:
        info = json.load(f)
    want = info.get("tokenizer_fingerprint")
    require(
        want in (None, tok.fingerprint()),
        f"dataset {prefix} was tokenized with a different tokenizer ({info.get('tokenizer')}) "
        "than the model's; re-run `minitron preprocess` with the model's tokenizer",
    )


def resolve_blend(entries: list, tok: Tokenizer, cfg: DataConfig):
    """``data.*`` entries -> Megatron blend ``([prefixes], [weights] or None)``."""
    entries = list(entries)
    if not entries:
        return None
    weighted = isinstance(entries[0], (int, float)) and not isinstance(entries[0], bool)
    if weighted:
        require(len(entries) % 2 == 0, f"blend {entries} must alternate weight, path")
        weights = [float(w) for w in entries[0::2]]
        paths = [str(p) for p in entries[1::2]]
        require(all(w > 0 for w in weights), f"blend weights must be positive: {weights}")
    else:
        weights, paths = None, [str(p) for p in entries]
    prefixes = []
    for p in paths:
        if _is_prefix(p):
            _check_prefix_tokenizer(p, tok)
            prefixes.append(p)
        elif p.startswith("demo:") or os.path.isfile(p):
            prefixes.append(_cached_prefix(p, tok, cfg))
        else:
            raise MinitronError(
                f"data prefix {p} not found: no {p}.bin/{p}.idx and no such text/JSONL file; "
                "run `minitron preprocess` or fix the path"
            )
    return prefixes, weights


def _check_size(prefixes: list[str], seq_length: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for p in prefixes:
        ds = IndexedDataset(p)  # keep it alive: sequence_lengths is a view of its mmap
        n = int(ds.sequence_lengths.sum())
        del ds
        require(
            n > seq_length,
            f"dataset {p} holds {n} tokens, fewer than one sample of "
            f"train.seq_length+1={seq_length + 1}; add data or shorten it",
        )


def build_datasets(
    cfg: DataConfig,
    tok: Tokenizer,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
):
    """(train, valid) GPTDatasets with at least the requested number of samples each."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    train = resolve_blend(cfg.train, tok, cfg)
    require(train is not None, "data.train is empty; pass data.train=[PREFIX or FILE]")
    valid = resolve_blend(cfg.valid, tok, cfg)
    _check_size(train[0] + (valid[0] if valid else []), seq_length)
    common = dict(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=os.path.join(cfg.cache_dir, "index-cache"),
        mid_level_dataset_surplus=0.005,
    )
    if valid is None:
        config = GPTDatasetConfig(blend=train, split=cfg.split, **common)
    else:
        config = GPTDatasetConfig(blend_per_split=[train, valid, None], **common)
    try:
        train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, None], lambda: True, config
        ).build()
    except (AssertionError, ValueError, IndexError) as e:
        raise MinitronError(
            f"cannot build datasets from data.train/data.valid ({e}); check "
            "the split and that each part holds at least one sequence"
        ) from e
    require(train_ds is not None and len(train_ds) > 0, "the training split is empty")
    require(
        valid_samples == 0 or (valid_ds is not None and len(valid_ds) > 0),
        "the validation split is empty; set data.valid or give data.split a valid share",
    )
    return train_ds, valid_ds


def build_eval_dataset(cfg: DataConfig, tok: Tokenizer, seq_length: int, seed: int, samples: int):
    """A validation GPTDataset from ``data.valid`` (or, if empty, all of ``data.train``)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blend = resolve_blend(cfg.valid or cfg.train, tok, cfg)
    require(blend is not None, "no evaluation data: set data.valid=[PREFIX or FILE]")
    _check_size(blend[0], seq_length)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tok,
        blend_per_split=[None, blend, None],
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=os.path.join(cfg.cache_dir, "index-cache"),
    )
    _, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [None, samples, None], lambda: True, config
    ).build()
    return valid


def collate(samples: list[dict]) -> dict:
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    return {k: torch.stack([torch.as_tensor(np.asarray(s[k])) for s in samples]) for k in keys}


class GlobalBatches:
    """Deterministic global batches: step ``i`` reads samples ``[i*G, (i+1)*G)`` of the dataset
    (already shuffled by Megatron); data-parallel rank ``r`` takes its contiguous share, split
    into micro-batches. Position = consumed samples, so resuming is exact."""

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int):
        require(
            global_batch % (micro_batch * dp_size) == 0,
            f"train.global_batch_size={global_batch} is not divisible by "
            f"train.micro_batch_size={micro_batch} x data-parallel size {dp_size}; "
            "make it a multiple",
        )
        self.ds, self.g, self.mbs = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size

    @property
    def num_microbatches(self) -> int:
        return self.g // (self.mbs * self.dp_size)

    def get(self, step: int) -> list[dict]:
        share = self.g // self.dp_size
        start = step * self.g + self.dp_rank * share
        idx = [(start + j) % len(self.ds) for j in range(share)]
        return [
            collate([self.ds[i] for i in idx[k : k + self.mbs]]) for k in range(0, share, self.mbs)
        ]
