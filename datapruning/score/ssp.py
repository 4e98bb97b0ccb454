"""SSP as a pipeline metric: distance to the cluster centroid, or to the class prototype (docs/methods.md#ssp)."""
from __future__ import annotations

import numpy as np

from ..metrics.ssp import class_prototypes, prototypicality
from .base import MetricOutput, ScoreInputs


def score_ssp(inp: ScoreInputs, prototypes: str = "clusters") -> MetricOutput:
    """Pipeline adapter. ``prototypes``: ``clusters`` (self-supervised) or ``labels`` (class means)."""
    if prototypes == "clusters":
        return MetricOutput(inp.cos_dist.astype(np.float64), {"prototypes": "clusters"})
    if prototypes != "labels":
        raise ValueError(f"score.params.ssp.prototypes: expected 'clusters' or 'labels', got {prototypes!r}")
    if inp.labels is None:
        raise ValueError("score.params.ssp.prototypes=labels needs labels, but the input has none")
    known = inp.labels >= 0
    scores = np.full(len(inp.uid), np.nan)
    protos, inverse = class_prototypes(inp.embeddings[known], inp.labels[known])
    scores[known] = prototypicality(inp.embeddings[known], protos, inverse)
    scores[~known] = inp.cos_dist[~known]  # unlabelled rows fall back to their cluster prototype
    return MetricOutput(scores, {"prototypes": "labels", "classes": int(len(protos))})
