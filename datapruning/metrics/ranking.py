"""The one keep-preference order and the quota arithmetic every selection rule uses.

Every rule ranks rows by one total order: ``(order_key(score, mode), tie, row)`` ascending, where ``tie`` is a
seeded per-row hash (of the uid in the pipeline, of the row index for bare arrays). The selectors
(``datapruning.select``) keep the first rows of that order per group, over rows in memory or on disk alike.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..hashing import row_hash

MODES = ("hard", "easy", "random")
_TOP = np.uint64(1 << 63)
LAST = np.uint64(0xFFFFFFFFFFFFFFFF)


def order_key(scores: np.ndarray, mode: str) -> np.ndarray:
    """uint64 keys whose ascending order is keep preference: ``hard`` = largest score first, ``easy`` =
    smallest first, ``random`` = all equal (the tie key decides). NaN (unscored) sorts last in every mode;
    -0.0 == 0.0."""
    if mode not in MODES:
        raise ConfigError(f"select.mode must be one of {MODES}, got {mode!r}")
    s = np.asarray(scores, dtype=np.float64)
    if mode == "random":
        key = np.zeros(len(s), dtype=np.uint64)
    else:
        bits = ((-s if mode == "hard" else s) + 0.0).view(np.uint64)
        key = np.where(bits & _TOP, ~bits, bits | _TOP)
    key[np.isnan(s)] = LAST
    return key


def keep_count(n_total: int, keep_fraction: float | None, keep_count: int | None) -> int:
    """The number of samples to keep; exactly one of fraction or count must be given."""
    if (keep_fraction is None) == (keep_count is None):
        raise ConfigError("select: give exactly one of select.keep_fraction or select.keep_count")
    if keep_count is not None:
        if keep_count < 0:
            raise ConfigError(f"select.keep_count must be >= 0, got {keep_count}")
        return min(int(keep_count), n_total)
    if not 0.0 <= keep_fraction <= 1.0:
        raise ConfigError(f"select.keep_fraction must be in [0, 1], got {keep_fraction}")
    return int(round(keep_fraction * n_total))


def rank_order(scores: np.ndarray, mode: str, seed: int, tie: np.ndarray | None = None) -> np.ndarray:
    """Indices in keep-preference order (the order above): ``hard`` = largest score first, ``easy`` =
    smallest first, ``random`` = by the tie key; NaN last. Ties break by ``tie`` (default: a seeded hash of the
    row index), then by row, so the order is total."""
    key = order_key(scores, mode)
    tie = row_hash(len(key), seed) if tie is None else np.asarray(tie, dtype=np.uint64)
    return np.lexsort((np.arange(len(key)), tie, key))


def floor_quotas(sizes: np.ndarray, share: float, n: int) -> np.ndarray:
    """Per-group floor ``min(ceil(share * n / G), size)`` over the G groups with rows in play."""
    sizes = np.asarray(sizes, dtype=np.int64)
    present = sizes > 0
    if not present.any() or share <= 0:
        return np.zeros(len(sizes), np.int64)
    return np.where(present, np.minimum(int(np.ceil(share * n / present.sum())), sizes), 0)


def balanced_quotas(sizes: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` as evenly as possible over groups of ``sizes``, capped by each size (water-filling):
    leftover from small groups flows to larger ones; when fewer units than open groups remain, the lowest
    ids get one each. Returns quotas indexed by group id."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = min(int(n), int(sizes.sum()))
    quotas = np.zeros_like(sizes)
    left, open_ = n, sizes > 0
    while left > 0 and open_.any():
        ids = np.flatnonzero(open_)
        share = left // len(ids)
        if share == 0:
            quotas[ids[:left]] += 1
            break
        add = np.minimum(share, sizes[ids] - quotas[ids])
        quotas[ids] += add
        left -= int(add.sum())
        open_ = quotas < sizes
    return quotas
