"""Coverage-centric coreset selection (Zheng et al., ICLR 2023) for high pruning rates.

See docs/methods.md#ccs-coverage-centric-selection.
"""
from __future__ import annotations

import numpy as np

from .ranking import keep_by_quota, rank_order
from ..errors import ConfigError, InputError

# (prune fraction, beta) anchors: docs/methods.md#ccs-coverage-centric-selection gives 0.2 at 80% and 0.3 at
# 90% pruning; at <= 50% the hardest examples are worth keeping (beta 0). Linear in between, held at 0.3 above 90%.
BETA_ANCHORS = ((0.0, 0.0), (0.5, 0.0), (0.8, 0.2), (0.9, 0.3), (1.0, 0.3))


def ccs_default_beta(prune_fraction: float) -> float:
    """Default hard-cutoff ``beta`` for a prune fraction: piecewise linear over ``BETA_ANCHORS``
    (0 up to 50% pruning, 0.2 at 80%, 0.3 at 90% and above)."""
    if not 0.0 <= prune_fraction <= 1.0:
        raise ConfigError(f"ccs: prune fraction must be in [0, 1], got {prune_fraction}")
    xs, ys = zip(*BETA_ANCHORS)
    return float(np.interp(prune_fraction, xs, ys))


def ccs_allocate(sizes: np.ndarray, n: int) -> np.ndarray:
    """Budget per stratum: from the smallest stratum up, each gets ``min(|stratum|, rest // strata_left)``
    (the last one takes the remainder). Sums to exactly ``n`` when ``n <= sum(sizes)``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if not 0 <= n <= sizes.sum():
        raise InputError(f"ccs: cannot keep {n} rows from {int(sizes.sum())}")
    alloc = np.zeros_like(sizes)
    rest = int(n)
    order = np.argsort(sizes, kind="stable")
    for i, s in enumerate(order):
        alloc[s] = min(int(sizes[s]), rest // (len(order) - i))
        rest -= int(alloc[s])
    if rest:
        raise AssertionError(f"ccs_allocate: {rest} rows left unallocated")
    return alloc


def ccs_keep(scores, n, beta, n_strata, seed, eligible=None) -> tuple[np.ndarray, dict]:
    scores = np.asarray(scores, dtype=np.float64)
    valid = ~np.isnan(scores) if eligible is None else ~np.isnan(scores) & np.asarray(eligible, bool)
    if not 0.0 <= beta < 1.0 or int(n_strata) < 1:
        raise ConfigError(f"ccs: need 0 <= beta < 1 and n_strata >= 1, got beta={beta}, n_strata={n_strata}")
    order = rank_order(scores, "hard", seed)
    order = order[valid[order]]
    n_drop = int(beta * len(order))  # the hardest beta fraction: likely mislabelled
    pool = np.zeros(len(scores), dtype=bool)
    pool[order[n_drop:]] = True
    if not 0 <= n <= pool.sum():
        raise InputError(f"ccs: cannot keep {n} rows: {int(pool.sum())} remain after dropping the hardest "
                         f"{n_drop} (beta={beta}) of {len(order)} scored rows")
    strata = np.full(len(scores), -1, dtype=np.int64)
    if pool.any():
        lo, hi = scores[pool].min(), scores[pool].max()
        width = (hi - lo) / n_strata
        pos = np.floor((scores[pool] - lo) / width) if width > 0 else np.zeros(int(pool.sum()))
        strata[pool] = np.clip(pos, 0, n_strata - 1).astype(np.int64)  # the maximum joins the top stratum
    sizes = np.bincount(strata[pool], minlength=int(n_strata))
    alloc = ccs_allocate(sizes, int(n))
    uniform = np.random.default_rng(seed).random(len(scores))  # uniform sampling within each stratum
    keep = keep_by_quota(uniform, strata, alloc, "easy", seed, pool)
    info = {"beta": float(beta), "strata": int(n_strata), "dropped_hard": n_drop,
            "stratum_sizes": sizes.tolist(), "stratum_kept": alloc.tolist()}
    return keep, info


def ccs_select(scores: np.ndarray, n: int, beta: float = 0.0, n_strata: int = 50, seed: int = 0,
               eligible: np.ndarray | None = None) -> np.ndarray:
    """CCS keep mask with exactly ``n`` rows: drop the hardest ``floor(beta * N)`` (highest scores;
    NaN/ineligible rows are never kept), split the remaining score range into ``n_strata``
    equal-width strata, allocate with ``ccs_allocate`` and sample uniformly within each stratum
    (seeded). ValueError when fewer than ``n`` rows remain."""
    return ccs_keep(scores, n, beta, n_strata, seed, eligible)[0]
