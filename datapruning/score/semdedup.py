"""SemDeDup as a pipeline metric: duplicate scores computed one group of whole clusters at a time.

stats.json gets the removed count per eps and the eps that reaches common keep fractions. See
docs/methods.md#semdedup-semantic-deduplication.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..metrics.ranking import MODES
from ..metrics.semdedup import DEFAULT_EPS, REPORT_KEEP_FRACTIONS, dedup_summary, semdedup_scores
from .base import Metric
from .semdedup_stream import stream_group
from ..params import MAX_INT, setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SemDeDupParams:
    mode: str = setting("hard", choices=MODES)  # which duplicate survives: hard = farthest from the centroid
    block_rows: int = setting(2048, ge=1, le=1 << 16)  # similarity block edge (memory: block_rows**2 float64)
    eps: tuple[float, ...] = setting(DEFAULT_EPS, ge=0.0, le=2.0)  # eps values whose removed counts go to stats.json
    seed: int | None = setting(None, ge=0, le=MAX_INT)


def score(block: dict, state: dict, params: SemDeDupParams) -> np.ndarray:
    return semdedup_scores(block["embedding"], block["cluster"], block["cos_dist"], params.mode, params.seed,
                           int(params.block_rows), tie=block["tie"])


def summarize(rows, params: SemDeDupParams, state: dict) -> dict:
    info = {"mode": params.mode, "block_rows": int(params.block_rows), "n": int(rows.n),
            **dedup_summary(rows, params.eps, REPORT_KEEP_FRACTIONS, "score_semdedup")}
    log.info("semdedup: removed per eps %s", info["removed"])
    return info


SEMDEDUP = Metric("semdedup", SemDeDupParams, score, unit="cluster", reads=frozenset({"embedding"}),
                  summarize=summarize, stream=stream_group)
