"""Metric registry: name -> pipeline adapter. A new metric is one file plus one line here."""
from __future__ import annotations

from .base import MetricFn, MetricOutput, ScoreInputs
from .random import random_scores, score_random
from .ssp import class_prototypes, prototypicality, score_ssp
from ..select import Selector, select_balanced, select_rank

METRICS: dict[str, MetricFn] = {
    "ssp": score_ssp,
    "random": score_random,
}

# Selectors: name -> (SelectInputs, n_keep, **params from config select.params) -> (keep, info)
SELECTORS: dict[str, Selector] = {
    "rank": select_rank,
    "balanced": select_balanced,
}

__all__ = [
    "METRICS", "SELECTORS", "MetricOutput", "ScoreInputs",
    "prototypicality", "class_prototypes", "random_scores",
]
