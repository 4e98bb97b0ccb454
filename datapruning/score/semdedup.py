"""SemDeDup as a pipeline metric: duplicate scores, removed counts per eps, eps per keep fraction (docs/methods.md#semdedup)."""
from __future__ import annotations

import logging

from ..metrics.semdedup import (DEFAULT_EPS, REPORT_KEEP_FRACTIONS, eps_for_keep_fraction, removed_counts,
                                semdedup_scores)
from .base import MetricOutput, ScoreInputs

log = logging.getLogger(__name__)


def score_semdedup(inp: ScoreInputs, mode: str = "hard", block_rows: int = 4096, eps=DEFAULT_EPS,
                   seed: int | None = None) -> MetricOutput:
    """Pipeline adapter: scores = duplicate score; info = removed count per eps and the eps that
    reaches common keep fractions (answers "which eps keeps 60%?")."""
    seed = inp.seed if seed is None else seed
    scores = semdedup_scores(inp.embeddings, inp.cluster, inp.cos_dist, mode, seed, block_rows)
    removed = removed_counts(scores, eps)
    info = {"mode": mode, "block_rows": int(block_rows), "n": int(len(scores)),
            "removed": {str(e): c for e, c in removed.items()},
            "eps_for_keep_fraction": {str(f): eps_for_keep_fraction(scores, f) for f in REPORT_KEEP_FRACTIONS}}
    log.info("semdedup: removed per eps %s", info["removed"])
    return MetricOutput(scores, info)
