"""DBP as a pipeline metric: each sample scores its cluster's complexity (docs/methods.md#dbp)."""
from __future__ import annotations

import numpy as np

from ..metrics.dbp import cluster_complexity, dbp_shares
from .base import MetricOutput, ScoreInputs


def score_dbp(inp: ScoreInputs, tau: float = 0.1, l: int = 20) -> MetricOutput:
    """Pipeline adapter: each sample scores its cluster's complexity ``C_a(i)`` (NaN when unassigned)."""
    cluster = np.asarray(inp.cluster, dtype=np.int64)
    C, intra, inter = cluster_complexity(inp.cos_dist, cluster, inp.centroids, l)
    scores = np.where(cluster >= 0, C[np.maximum(cluster, 0)], np.nan)
    info = {"tau": float(tau), "l": int(l), "complexity": C.tolist(), "d_intra": intra.tolist(),
            "d_inter": inter.tolist(), "shares": dbp_shares(C, tau).tolist()}
    return MetricOutput(scores, info)
