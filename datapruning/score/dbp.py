"""DBP as a pipeline metric: each sample scores its cluster's complexity C = d_intra * d_inter.

The complexity comes from exact per-cluster sums over every row (one pass); see
docs/methods.md#dbp-density-based-pruning.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from ..metrics.dbp import complexity, d_inter, d_intra_from_sums, dbp_shares
from ..metrics.fixed import fixed_sum
from ..rows import add
from .base import Metric
from ..params import MAX_INT, setting


@dataclass(frozen=True)
class DBPParams:
    tau: float = setting(0.1, gt=0.0, le=1e6)  # softmax temperature of the reported shares (the selector has its own)
    l: int = setting(20, ge=1, le=MAX_INT)  # nearest other centroids in d_inter


def cluster_sums(k: int, block: dict) -> tuple:
    """Per-cluster fixed-point sums of cos_dist and member counts over the rows in play (``eligible``)."""
    rows = block["cluster"] >= 0
    if "eligible" in block:
        rows &= block["eligible"]
    return (fixed_sum(block["cos_dist"][rows], block["cluster"][rows], k),
            np.bincount(block["cluster"][rows], minlength=k))


def cluster_complexity(rows, centroids: np.ndarray, l: int, inter: np.ndarray | None = None) -> tuple:
    """``(C, d_intra, d_inter, sizes)`` per cluster, from one pass over ``rows``; ``inter``: ``d_inter(centroids,
    l)`` when an earlier step computed it (k² x d work: the score stage keeps it in its state)."""
    k = len(centroids)
    sums, sizes = rows.reduce(partial(cluster_sums, k), add)
    intra = d_intra_from_sums(sums, sizes)
    inter = d_inter(centroids, l) if inter is None else np.asarray(inter, dtype=np.float64)
    return complexity(intra, inter), intra, inter, sizes


def prepare(ctx, params: DBPParams) -> dict:
    C, intra, inter, _ = cluster_complexity(ctx.rows, ctx.centroids, params.l)
    return {"complexity": C, "d_intra": intra, "d_inter": inter}


def score(block: dict, state: dict, params: DBPParams) -> np.ndarray:
    cluster = block["cluster"]
    return np.where(cluster >= 0, state["complexity"][np.maximum(cluster, 0)], np.nan)


def summarize(rows, params: DBPParams, state: dict) -> dict:
    C = state["complexity"]
    return {"tau": float(params.tau), "l": int(params.l), "complexity": C.tolist(),
            "d_intra": state["d_intra"].tolist(), "d_inter": state["d_inter"].tolist(),
            "shares": dbp_shares(C, params.tau).tolist()}


DBP = Metric("dbp", DBPParams, score, prepare=prepare, summarize=summarize)
