"""SemDeDup as a pipeline metric: duplicate scores computed one group of whole clusters at a time.

stats.json gets the removed count per eps and the eps that reaches common keep fractions. See
docs/methods.md#semdedup-semantic-deduplication.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..cutoffs import find_cutoffs
from ..metrics.ranking import MODES, order_key
from ..metrics.semdedup import DEFAULT_EPS, REPORT_KEEP_FRACTIONS, semdedup_scores
from ..rows import add
from .base import Metric, choice, positive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SemDeDupParams:
    mode: str = "hard"  # which duplicate survives: hard = farthest from the centroid
    block_rows: int = 2048  # similarity block edge (memory: block_rows**2 float32; 2048 was as fast as 4096 here)
    eps: tuple = DEFAULT_EPS  # eps values whose removed counts go to stats.json
    seed: int | None = None

    def check(self):
        choice("score.params.semdedup.mode", self.mode, MODES)
        positive("score.params.semdedup.block_rows", self.block_rows)
        if not isinstance(self.eps, (list, tuple)) or not all(isinstance(e, (int, float)) and e >= 0 for e in self.eps):
            choice("score.params.semdedup.eps", self.eps, ["a list of numbers >= 0"])


def score(block: dict, state: dict, params: SemDeDupParams) -> np.ndarray:
    return semdedup_scores(block["embedding"], block["cluster"], block["cos_dist"], params.mode, params.seed,
                           int(params.block_rows), tie=block["tie"])


def _removed(column: str, eps: tuple, block: dict) -> np.ndarray:
    s = block[column]
    with np.errstate(invalid="ignore"):
        return np.array([np.count_nonzero(s > 1.0 - float(e)) for e in eps] + [np.count_nonzero(~np.isnan(s))])


def _score_keys(column: str, block: dict) -> tuple:
    s = block[column]
    g = np.where(np.isnan(s), -1, 0)
    return g, order_key(s, "easy"), block["tie"], block["pos"].astype(np.uint64)


def key_to_score(key: np.uint64) -> float:
    """The score whose ``order_key(., "easy")`` is ``key`` (the inverse of that encoding)."""
    top = np.uint64(1 << 63)
    bits = np.uint64(key) ^ top if np.uint64(key) & top else ~np.uint64(key)
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def eps_for_keep_fraction_rows(rows, column: str, target: float) -> float:
    """``metrics.semdedup.eps_for_keep_fraction`` over rows seen block by block (the same value)."""
    counts = rows.reduce(partial(_removed, column, ()), add)
    n = int(counts[-1]) if counts is not None else 0
    if n == 0:
        return 0.0
    want = min(max(int(np.ceil(target * n - 1e-9)), 1), n)
    keys = partial(_score_keys, column)
    cut = find_cutoffs(rows, keys, np.array([want]), np.array([n]))
    if cut.kind[0] == 1:  # every scored row kept: the threshold is the largest score
        want_score = rows.reduce(partial(_max_score, column), max)
    else:
        last = find_last(rows, keys, cut)
        want_score = key_to_score(last)
    eps = max(0.0, 1.0 - want_score)
    while eps > 0 and n - int(rows.reduce(partial(_removed, column, (eps,)), add)[0]) < want:
        eps = float(np.nextafter(eps, 0.0))  # undo float round-off in 1 - (1 - s)
    return float(eps)


def _max_score(column: str, block: dict) -> float:
    s = block[column]
    return float(np.nanmax(s)) if np.any(~np.isnan(s)) else -np.inf


def _last_kept(keys, cut, block: dict) -> np.uint64:
    g, k0, k1, k2 = keys(block)
    kept = cut.keep(g, k0, k1, k2)
    return k0[kept].max() if kept.any() else np.uint64(0)


def find_last(rows, keys, cut) -> np.uint64:
    """The largest primary key among the rows ``cut`` keeps (one pass)."""
    return rows.reduce(partial(_last_kept, keys, cut), max)


def removed_per_eps(rows, column: str, eps) -> dict:
    counts = rows.reduce(partial(_removed, column, tuple(eps)), add)
    return {str(e): int(c) for e, c in zip(eps, counts[:-1])}


def summarize(rows, params: SemDeDupParams, state: dict) -> dict:
    column = "score_semdedup"
    info = {"mode": params.mode, "block_rows": int(params.block_rows), "n": int(rows.n),
            "removed": removed_per_eps(rows, column, params.eps),
            "eps_for_keep_fraction": {str(f): eps_for_keep_fraction_rows(rows, column, f)
                                      for f in REPORT_KEEP_FRACTIONS}}
    log.info("semdedup: removed per eps %s", info["removed"])
    return info


SEMDEDUP = Metric("semdedup", SemDeDupParams, score, unit="cluster", reads=frozenset({"embedding"}),
                  summarize=summarize)
