"""Coverage-centric coreset selection (Zheng et al., ICLR 2023): the default beta, the strata and the budget split.

The selection itself is ``datapruning.select.ccs_select`` (arrays) or ``select.method: ccs`` (a run), one code path.

See docs/methods.md#ccs-coverage-centric-selection.
"""
from __future__ import annotations

import numpy as np

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


def ccs_strata(scores: np.ndarray, lo: float, hi: float, n_strata: int) -> np.ndarray:
    """Stratum of each score: ``n_strata`` equal-width bins over ``[lo, hi]`` (the maximum joins the top one;
    all in stratum 0 when ``hi == lo``), int64."""
    width = (hi - lo) / n_strata
    pos = np.floor((np.asarray(scores, dtype=np.float64) - lo) / width) if width > 0 else np.zeros(len(scores))
    return np.clip(np.nan_to_num(pos, nan=0.0), 0, n_strata - 1).astype(np.int64)
