"""Training / validation data: blends of indexed datasets through Megatron's
``BlendedMegatronDatasetBuilder`` + ``GPTDataset``, and deterministic global batches.

``data.train`` / ``data.valid`` entries are any of:

* an indexed-dataset prefix (``data/corpus`` for ``data/corpus.bin/.idx``);
* a blend ``[0.7, data/a, 0.3, data/b]`` (weights then prefixes);
* a text or JSONL file, tokenized on first use with the model's tokenizer into ``data.cache_dir``
  (by global rank 0, while the other ranks wait on the filesystem, see ``data/rank0_build.py``);
* ``demo:stdlib-code`` / ``demo:stdlib-docs`` - the built-in corpora (no download); used only
  when named: there is no default data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from minitron_mcore.data.rank0_build import rank0_builds
from minitron_mcore.data.tokenizer import Tokenizer
from minitron_mcore.errors import MinitronError, require
from minitron_mcore.utils.log import human_count, log0


@dataclass
class DataConfig:
    """Where training and validation tokens come from."""

    train: list = field(default_factory=list)
    """Training data: prefixes, a weighted blend ``[w1, p1, w2, p2]``, text/JSONL files or
    ``demo:<name>``. Required: there is no default corpus (name ``demo:stdlib-code`` to use
    the built-in one)."""
    valid: list = field(default_factory=list)
    """Validation data (same forms). Empty: a held-out split of ``train`` (see ``split``);
    ``evaluate`` reads ``train`` whole."""
    split: str = "95,5,0"
    """train/valid/test proportions used when ``valid`` is empty."""
    cache_dir: str = "runs/data"
    """Where text files and demo corpora are tokenized to, and Megatron's index cache. Made
    absolute when the config is built (relative to the current directory), so launch every
    node from the same directory; it must be on a filesystem every node sees (global rank 0
    writes it and the other ranks wait there for its files)."""
    json_key: str = "text"
    """Text field of JSONL records."""
    text_mode: str = "file"
    """How plain-text files split into documents: file, line or paragraph."""
    preprocess_workers: int = 2
    """Tokenizer processes for on-the-fly preprocessing."""

    def __post_init__(self):
        self.cache_dir = os.path.abspath(os.path.expanduser(str(self.cache_dir)))


NO_DATA = (
    "data.train is empty; pass data.train=[PREFIX or FILE] "
    "(or demo:stdlib-code for the built-in demo corpus)"
)


def require_data(cfg: DataConfig, evaluation: bool = False) -> None:
    """Fail with one line when no data was named (``evaluation``: ``data.valid`` counts too)."""
    if evaluation:
        require(
            bool(cfg.valid or cfg.train), NO_DATA.replace("is empty", "and data.valid are empty")
        )
    else:
        require(bool(cfg.train), NO_DATA)


def is_token_prefix(p: str) -> bool:
    """Whether ``p`` names a tokenized dataset (``p.bin`` and ``p.idx``)."""
    return os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")


def _cached_prefix(source: str, tok: Tokenizer, cfg: DataConfig) -> str:
    """Tokenize a text/JSONL file (or demo corpus) once per tokenizer into the cache."""
    from minitron_mcore.data import preprocess
    from minitron_mcore.data.demo import check_demo_name, write_demo

    if source.startswith("demo:"):
        name, demo_dir = source[5:], os.path.join(cfg.cache_dir, "demo")
        check_demo_name(name)  # on every rank, before any waiting
        rank0_builds(source, lambda report: write_demo(name, demo_dir), cfg.cache_dir)
        source = write_demo(name, demo_dir)  # the file exists now: just its path
    stat = os.stat(source)
    key = hashlib.sha256(
        f"{os.path.abspath(source)}|{stat.st_size}|{stat.st_mtime_ns}|{cfg.json_key}|"
        f"{cfg.text_mode}".encode()
    ).hexdigest()[:10]
    name = os.path.splitext(os.path.basename(source))[0]
    prefix = os.path.join(cfg.cache_dir, f"{name}-{key}-{tok.fingerprint()}")

    def build(report: Callable[[str], None]) -> None:
        # Rank 0 alone decides and writes; every rank takes part in _rank0_builds (a rank that
        # saw the finished files early and returned would leave the others waiting forever).
        if is_token_prefix(prefix):
            return
        log0("tokenizing %s -> %s (the other ranks wait for it)", source, prefix)
        docs = preprocess.iter_documents([source], cfg.json_key, cfg.text_mode)
        preprocess.write_indexed(
            docs,
            tok.path,
            prefix,
            max(1, cfg.preprocess_workers),
            on_progress=lambda n, t: report(f"{n} documents, {human_count(t)} tokens"),
        )

    rank0_builds(f"the tokenized {source}", build, cfg.cache_dir)
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
        if is_token_prefix(p):
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


def _open_indexed(prefix: str):
    """Megatron's IndexedDataset over ``prefix``, or one clear error for an empty, truncated or
    corrupt ``.bin``/``.idx`` pair (Megatron asserts, and its ``__del__`` of a half-built
    reader prints a second traceback, so the pair is checked before it is opened)."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

    redo = "re-create it with `minitron preprocess`"
    with open(prefix + ".idx", "rb") as f:
        header = f.read(len(_INDEX_HEADER))
    require(header == _INDEX_HEADER, f"{prefix}.idx is not a Megatron index (bad header); {redo}")
    require(os.path.getsize(prefix + ".bin") > 0, f"dataset {prefix} is empty; {redo}")
    try:
        ds = IndexedDataset(prefix)
    except (AssertionError, ValueError, OSError, struct.error) as e:
        raise MinitronError(f"dataset {prefix} is corrupt ({e}); {redo}") from e
    idx = ds.index
    need = 0
    if len(idx.sequence_lengths):
        need = int(idx.sequence_pointers[-1]) + int(idx.sequence_lengths[-1]) * idx.dtype_size
    have = os.path.getsize(prefix + ".bin")
    require(
        have == need,
        f"dataset {prefix}.bin holds {have} bytes but its .idx describes {need} (a truncated "
        f"or mismatched pair); {redo}",
    )
    return ds


def _check_size(prefixes: list[str], seq_length: int) -> None:
    for p in prefixes:
        ds = _open_indexed(p)  # keep it alive: sequence_lengths is a view of its mmap
        n = int(ds.sequence_lengths.sum())
        del ds
        require(
            n > seq_length,
            f"dataset {p} holds {n} tokens, fewer than one sample of "
            f"train.seq_length+1={seq_length + 1}; add data or shorten it",
        )


def _gpt_config_keys(seed: int, seq_length: int, tok: Tokenizer, cfg: DataConfig) -> dict:
    """The ``GPTDatasetConfig`` keys training and evaluation share: plain causal-LM samples
    (no position resets, no EOD masking), Megatron's index cache in ``data.cache_dir``."""
    return dict(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=os.path.join(cfg.cache_dir, "index-cache"),
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

    require_data(cfg)
    train = resolve_blend(cfg.train, tok, cfg)
    valid = resolve_blend(cfg.valid, tok, cfg)
    _check_size(train[0] + (valid[0] if valid else []), seq_length)
    common = dict(_gpt_config_keys(seed, seq_length, tok, cfg), mid_level_dataset_surplus=0.005)
    if valid is None:
        config = GPTDatasetConfig(blend=train, split=cfg.split, **common)
    else:
        config = GPTDatasetConfig(blend_per_split=[train, valid, None], **common)
    try:
        train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, _unused(train)], lambda: True, config
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


def build_eval_dataset(
    cfg: DataConfig,
    tok: Tokenizer,
    seq_length: int,
    seed: int,
    samples: int,
    held_out: bool = False,
):
    """A validation GPTDataset from ``data.valid`` (or, if empty, all of ``data.train``).

    ``held_out``: without ``data.valid``, only the validation share of ``data.train`` under
    ``data.split`` - the documents training held out (``build_datasets`` splits the same way)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    require_data(cfg, evaluation=True)
    blend = resolve_blend(cfg.valid or cfg.train, tok, cfg)
    _check_size(blend[0], seq_length)
    if held_out and not cfg.valid:
        where = dict(blend=blend, split=cfg.split)
    else:
        where = dict(blend_per_split=[None, blend, None])
    config = GPTDatasetConfig(**_gpt_config_keys(seed, seq_length, tok, cfg), **where)
    unused = _unused(blend) if "split" in where else None
    _, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [unused, samples, unused], lambda: True, config
    ).build()
    return valid


def _unused(blend) -> int | None:
    """The sample count of a split that is not read: None (Megatron builds nothing), but 0 for
    a weighted blend cut by ``data.split`` - Megatron's builder refuses None there (it has no
    size to spread over the weights)."""
    return 0 if blend[1] is not None else None


def collate(samples: list[dict]) -> dict:
    """One micro-batch ``{tokens, labels, loss_mask, position_ids}``, each ``[b, s]``, on the
    host. On a GPU machine in pinned memory, so that ``parallel.to_device`` - the one place a
    batch crosses to the models' device (``train.step.run_schedule``) - copies it
    asynchronously."""
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    out = {k: torch.stack([torch.as_tensor(np.asarray(s[k])) for s in samples]) for k in keys}
    if torch.cuda.is_available():
        out = {k: v.pin_memory() for k, v in out.items()}
    return out


class GlobalBatches:
    """Deterministic global batches: the batch at position ``c`` (samples consumed before it)
    reads samples ``[c, c+G)`` of the dataset (already shuffled by Megatron); data-parallel rank
    ``r`` takes its contiguous share, split into micro-batches. Position = consumed samples, so
    resuming is exact, also with another global batch size."""

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
        """The micro-batches of global batch ``step`` (0-based) of a run that never changed
        its global batch size."""
        return self.get_at(step * self.g)

    def get_at(self, first: int) -> list[dict]:
        """The micro-batches of the global batch that starts at sample ``first`` (the samples
        consumed before it: a resumed run continues from the stored count, whatever the
        global batch size was then)."""
        share = self.g // self.dp_size
        start = first + self.dp_rank * share
        idx = [(start + j) % len(self.ds) for j in range(share)]
        out = []
        for k in range(0, share, self.mbs):
            mb = collate([self.ds[i] for i in idx[k : k + self.mbs]])
            # each sample's position in the read order: where stored teacher predictions are
            mb["positions"] = torch.arange(start + k, start + k + self.mbs)
            out.append(mb)
        return out
