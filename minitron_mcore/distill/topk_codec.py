"""Compact rows for stored top-k teacher predictions (``distill.offline``): one fixed-size byte
row per token, so a shard is sliced by token without an index.

A row holds the k vocabulary ids packed to the vocabulary's bit width (17 bits for a 128K
vocabulary instead of 32), then the k log-probabilities and the tail's log-mass:

* ``bf16``: k + 1 bfloat16 values (2 bytes each);
* ``int8``: the top-1 log-probability and the quantisation step as bfloat16, then each gap to
  the top-1 in 8 bits (uniform in log space between the top-1 and the k-th; error <= step / 2),
  and the tail as bfloat16.

At k = 64 and a 128K vocabulary: 136 + 130 = 266 bytes (bf16) or 136 + 6 + 64 = 206 bytes
(int8) per token. No library packs integers to an arbitrary bit width in torch or numpy, so the
bit packing is written here (``numpy.packbits`` over each id's bits).
"""

from __future__ import annotations

import numpy as np
import torch

from minitron_mcore.errors import require

PRECISIONS = ("bf16", "int8")


def id_bits(vocab_size: int) -> int:
    """Bits per stored id."""
    return max(1, (int(vocab_size) - 1).bit_length())


def row_bytes(k: int, vocab_size: int, precision: str) -> int:
    """Bytes per token."""
    require(precision in PRECISIONS, f"top-k precision {precision!r}: use one of {PRECISIONS}")
    ids = -(-k * id_bits(vocab_size) // 8)
    return ids + (2 * (k + 1) if precision == "bf16" else 4 + k + 2)


def _bf16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(x.shape[0], -1)


def _from_bf16_bytes(b: np.ndarray, n: int) -> torch.Tensor:
    raw = np.ascontiguousarray(b).view(np.int16).reshape(n, -1)
    return torch.from_numpy(raw.copy()).view(torch.bfloat16).float()


def encode(
    ids: torch.Tensor, logp: torch.Tensor, log_tail: torch.Tensor, vocab_size: int, precision: str
) -> np.ndarray:
    """``ids`` [n, k], ``logp`` [n, k] (descending), ``log_tail`` [n] -> ``[n, row_bytes]``
    uint8."""
    n, k = ids.shape
    bits = id_bits(vocab_size)
    require(int(ids.max()) < 2**bits and int(ids.min()) >= 0, "stored ids outside the vocabulary")
    shifts = np.arange(bits, dtype=np.int64)
    id_bits_arr = ((ids.cpu().numpy()[..., None] >> shifts) & 1).astype(np.uint8)  # [n, k, b]
    packed = np.packbits(id_bits_arr.reshape(n, -1), axis=-1, bitorder="little")
    logp, log_tail = logp.float().cpu(), log_tail.float().cpu()
    if precision == "bf16":
        vals = _bf16_bytes(torch.cat([logp, log_tail[:, None]], -1))
    else:
        require(precision == "int8", f"top-k precision {precision!r}: use one of {PRECISIONS}")
        top = logp[:, :1]
        gaps = (top - logp).clamp(min=0)
        step = (gaps.max(-1, keepdim=True).values / 255).clamp(min=1e-8)
        step = step.to(torch.bfloat16).float()  # the stored step is the one decoding uses
        q = torch.round(gaps / step).clamp(0, 255).to(torch.uint8).numpy()
        vals = np.concatenate(
            [_bf16_bytes(torch.cat([top, step], -1)), q, _bf16_bytes(log_tail[:, None])], -1
        )
    return np.concatenate([packed, vals], -1)


def decode(rows: np.ndarray, k: int, vocab_size: int, precision: str):
    """Inverse of :func:`encode`: ``(ids [n, k] int64, logp [n, k] fp32, log_tail [n] fp32)``."""
    rows = np.asarray(rows, dtype=np.uint8)
    n = rows.shape[0]
    bits = id_bits(vocab_size)
    nid = -(-k * bits // 8)
    unpacked = np.unpackbits(rows[:, :nid], axis=-1, bitorder="little")[:, : k * bits]
    weights = 1 << np.arange(bits, dtype=np.int64)
    ids = (unpacked.reshape(n, k, bits).astype(np.int64) * weights).sum(-1)
    rest = rows[:, nid:]
    if precision == "bf16":
        vals = _from_bf16_bytes(rest, n)
        logp, log_tail = vals[:, :k], vals[:, k]
    else:
        head = _from_bf16_bytes(rest[:, :4], n)  # top-1, step
        q = torch.from_numpy(rest[:, 4 : 4 + k].astype(np.float32))
        logp = head[:, :1] - q * head[:, 1:2]
        log_tail = _from_bf16_bytes(rest[:, 4 + k :], n)[:, 0]
    return torch.from_numpy(ids), logp, log_tail
