"""Inputs and outputs shared by every registered metric (the score stage's contract)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class ScoreInputs:
    """Everything the score stage hands a metric, aligned by row (row i is ``uid[i]``).

    embeddings: float32 [N, d], L2-normalised. cluster: int64 [N]. cos_dist: float32 [N],
    ``1 - <x_i, c_a(i)>``. centroids: float32 [k, d], normalised. labels: int64 [N] codes with
    -1 for unknown, or None when the input has no labels; label_names maps code -> original.
    """

    uid: np.ndarray
    embeddings: np.ndarray
    cluster: np.ndarray
    cos_dist: np.ndarray
    centroids: np.ndarray
    labels: np.ndarray | None = None
    label_names: tuple = ()
    seed: int = 0


@dataclass(frozen=True)
class MetricOutput:
    """A per-sample score (float64 [N], larger = harder) and JSON-serialisable info for stats.json."""

    scores: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


# A pipeline metric: (inputs, **params from config score.params.<name>) -> MetricOutput
MetricFn = Callable[..., MetricOutput]
