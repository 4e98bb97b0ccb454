"""Exact per-group sums in fixed point, so a sum never depends on how rows were split into blocks."""
from __future__ import annotations

import numpy as np

SCALE = 2.0 ** 30  # |value| <= 2 per row: 2**31 per row, 2**61 for a billion rows, inside int64


def fixed_sum(values: np.ndarray, groups: np.ndarray, k: int, scale: float = SCALE) -> np.ndarray:
    """Per-group sums of ``values`` ([n] or [n, d], |v| <= 2) as int64 in ``1/scale`` units (k rows)."""
    q = np.rint(np.asarray(values, dtype=np.float64) * scale).astype(np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    out = np.zeros((k,) + q.shape[1:], dtype=np.int64)
    if len(groups):
        order = np.argsort(groups, kind="stable")
        g = groups[order]
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        out[g[starts]] = np.add.reduceat(q[order], starts, axis=0)
    return out


def fixed_mean(sums: np.ndarray, counts: np.ndarray, scale: float = SCALE) -> np.ndarray:
    """float64 means from ``fixed_sum`` sums ([k] or [k, d]) and counts [k] (0 where the count is 0)."""
    sums = np.asarray(sums)
    counts = np.asarray(counts, dtype=np.float64).reshape((-1,) + (1,) * (sums.ndim - 1))
    return np.divide(sums.astype(np.float64) / scale, counts, out=np.zeros(sums.shape), where=counts > 0)
