"""SemDeDup as a pipeline metric: duplicate scores computed one group of whole clusters at a time.

stats.json gets the removed count per eps and the eps that reaches common keep fractions. See
docs/methods.md#semdedup-semantic-deduplication.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..metrics.ranking import MODES
from ..metrics.semdedup import DEFAULT_EPS, REPORT_KEEP_FRACTIONS, eps_for_keep_fraction, removed_per_eps, semdedup_scores
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


def summarize(rows, params: SemDeDupParams, state: dict) -> dict:
    column = "score_semdedup"
    info = {"mode": params.mode, "block_rows": int(params.block_rows), "n": int(rows.n),
            "removed": removed_per_eps(rows, params.eps, column),
            "eps_for_keep_fraction": {str(f): eps_for_keep_fraction(rows, f, column) for f in REPORT_KEEP_FRACTIONS}}
    log.info("semdedup: removed per eps %s", info["removed"])
    return info


SEMDEDUP = Metric("semdedup", SemDeDupParams, score, unit="cluster", reads=frozenset({"embedding"}),
                  summarize=summarize)
