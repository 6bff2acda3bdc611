"""A directory of stored top-k teacher predictions, indexed by the position of a sample in the
training order (the order ``distill`` reads its global batches in), so any TP/PP/DP layout of
the student finds its samples' rows without the teacher.

    LOGITS/manifest.json        what was stored and from what: k, precision, vocabulary, sequence
                                length, sample count, rows per shard, the fingerprint of
                                teacher + data + order + k (a student refuses a mismatch)
    LOGITS/shard-00000.npy      uint8 [shard_samples, seq_length, row_bytes]: the rows of
                                samples 0 .. shard_samples-1 (``distill.topk_codec``), the last
                                shard shorter

Shards are written whole (to a temporary name, flushed, renamed), so a killed writer leaves
complete shards and at most a stray ``.partial``; a re-run with the same manifest writes only
the missing shards. Reading maps the shards (``numpy.load(mmap_mode="r")``): a student reads
the rows of its micro-batch, never a whole shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from minitron_mcore.distill.topk_codec import row_bytes
from minitron_mcore.errors import MinitronError, require

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StoreInfo:
    fingerprint: str
    """Of teacher checkpoint + data + sample order + k + precision: what a reader checks."""
    k: int
    precision: str
    vocab_size: int
    seq_length: int
    samples: int
    shard_samples: int = 256

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.k, self.vocab_size, self.precision)

    @property
    def num_shards(self) -> int:
        return -(-self.samples // self.shard_samples)

    def shard_shape(self, i: int) -> tuple[int, int, int]:
        n = min(self.shard_samples, self.samples - i * self.shard_samples)
        return n, self.seq_length, self.row_bytes


def _shard(path: str, i: int) -> str:
    return os.path.join(path, f"shard-{i:05d}.npy")


class LogitStore:
    def __init__(self, path: str, info: StoreInfo):
        self.path, self.info = path, info
        self._maps: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ writing (resumable)

    @classmethod
    def create(cls, path: str, info: StoreInfo, overwrite: bool = False) -> LogitStore:
        """A store for ``info`` at ``path``: new, or the same store again (its complete shards
        kept: a resumed run). A directory holding anything else is refused unless
        ``overwrite``."""
        manifest = os.path.join(path, MANIFEST)
        if os.path.exists(path) and not overwrite:
            require(
                os.path.isfile(manifest) and _read_info(path) == info,
                f"save={path} already holds something else (not these teacher predictions); "
                "choose a new directory or pass overwrite=true",
            )
        else:
            if os.path.exists(path):
                for f in os.listdir(path):
                    if f == MANIFEST or f.startswith("shard-"):
                        os.remove(os.path.join(path, f))
            os.makedirs(path, exist_ok=True)
            tmp = manifest + ".partial"
            with open(tmp, "w") as f:
                json.dump(dict(asdict(info), format=1), f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, manifest)
        return cls(path, info)

    def missing(self) -> list[int]:
        """Shards not yet written whole."""
        return [i for i in range(self.info.num_shards) if not self._complete(i)]

    def _complete(self, i: int) -> bool:
        try:
            arr = np.load(_shard(self.path, i), mmap_mode="r")
        except (OSError, ValueError):
            return False
        return arr.shape == self.info.shard_shape(i) and arr.dtype == np.uint8

    def write_shard(self, i: int, rows: np.ndarray) -> None:
        require(
            rows.shape == self.info.shard_shape(i) and rows.dtype == np.uint8,
            f"shard {i} has shape {rows.shape}, expected {self.info.shard_shape(i)}",
        )
        final = _shard(self.path, i)
        tmp = final + ".partial"
        with open(tmp, "wb") as f:
            np.save(f, rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    # ------------------------------------------------------------------ reading

    @classmethod
    def open(cls, path: str, fingerprint: str | None = None) -> LogitStore:
        """The complete store at ``path``; ``fingerprint``: the one the reader expects (its
        teacher, data and sample order), refused in one line when it differs."""
        require(
            os.path.isfile(os.path.join(path, MANIFEST)),
            f"teacher_logits={path} is not a teacher-logits directory (no {MANIFEST}); "
            "write one with `minitron teacher-logits`",
        )
        store = cls(path, _read_info(path))
        missing = store.missing()
        require(
            not missing,
            f"teacher_logits={path} is incomplete ({len(missing)} of "
            f"{store.info.num_shards} shards missing, first {missing[:3]}); re-run "
            "`minitron teacher-logits` with the same keys to finish it",
        )
        require(
            fingerprint is None or store.info.fingerprint == fingerprint,
            f"teacher_logits={path} were computed for another teacher, data or sample order; "
            "re-run `minitron teacher-logits` with this run's data.*, train.* and seed keys",
        )
        return store

    def rows(self, positions) -> np.ndarray:
        """The rows of the samples at ``positions`` (training order): [len, seq, row_bytes]."""
        out = np.empty((len(positions), self.info.seq_length, self.info.row_bytes), np.uint8)
        per = self.info.shard_samples
        for j, p in enumerate(positions):
            require(
                0 <= p < self.info.samples,
                f"sample {p} is beyond the {self.info.samples} samples the teacher predictions "
                "cover; compute them for this run's train.steps x train.global_batch_size",
            )
            i = p // per
            if i not in self._maps:
                self._maps[i] = np.load(_shard(self.path, i), mmap_mode="r")
            out[j] = self._maps[i][p - i * per]
        return out


def _read_info(path: str) -> StoreInfo:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            raw = json.load(f)
        raw.pop("format", None)
        return StoreInfo(**raw)
    except (OSError, ValueError, TypeError) as e:
        raise MinitronError(f"{path}/{MANIFEST} is unreadable ({e}); re-run teacher-logits") from e
