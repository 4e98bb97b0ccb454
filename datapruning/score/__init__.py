"""The score stage's metric registry: name -> pipeline metric. A new metric is one file plus one line here."""
from __future__ import annotations

from .base import MetricFn, MetricOutput, ScoreInputs
from .dbp import score_dbp
from .dp4tl import score_dp4tl_fm, score_dp4tl_lm
from .el2n import score_el2n
from .random import score_random
from .semdedup import score_semdedup
from .ssp import score_ssp

METRICS: dict[str, MetricFn] = {
    "ssp": score_ssp,
    "random": score_random,
    "semdedup": score_semdedup,
    "dbp": score_dbp,
    "dp4tl_lm": score_dp4tl_lm,
    "dp4tl_fm": score_dp4tl_fm,
    "el2n": score_el2n,
}

__all__ = ["METRICS", "MetricFn", "MetricOutput", "ScoreInputs"]
