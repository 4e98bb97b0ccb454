"""The seeded uid hash: the one key that samples, orders and breaks ties, vectorised over the uid bytes.

Every choice that samples or orders rows (fit sample, k-means start, ties, random scores, training order) uses it,
so no value depends on a row's position, its shard or the order shards were read in. See
docs/methods.md#random-seeded-baseline.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (a bijection with good avalanche)."""
    z = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _seed_word(seed: int) -> np.uint64:
    with np.errstate(over="ignore"):
        return mix64(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)[0]


def uid_hash(uids, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each uid's UTF-8 bytes (uint64 [n]), 8 bytes at a time over the Arrow buffers."""
    arr = uids if isinstance(uids, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(uids, dtype=object).astype(str))
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data, np.zeros(8, np.uint8)])  # reads past the last uid stay in bounds
    start, length = offsets[:-1], np.diff(offsets)
    h = np.full(n, _seed_word(seed), dtype=np.uint64)
    lanes = np.arange(8)
    with np.errstate(over="ignore"):
        for w in range(int(length.max(initial=0) + 7) // 8):
            rows = np.flatnonzero(length > 8 * w)
            idx = start[rows, None] + 8 * w + lanes
            chunk = np.where(lanes < (length[rows, None] - 8 * w), data[np.minimum(idx, len(data) - 1)], 0)
            word = np.ascontiguousarray(chunk.astype(np.uint8)).view("<u8").ravel()
            h[rows] = mix64(h[rows] ^ word) + _GOLDEN
        return mix64(h ^ length.astype(np.uint64))


def row_hash(n: int, seed: int) -> np.ndarray:
    """The tie key for rows that have no uid (importable functions on bare arrays): a hash of the row index."""
    with np.errstate(over="ignore"):
        return mix64(np.arange(n, dtype=np.uint64) * _GOLDEN + _seed_word(seed))
