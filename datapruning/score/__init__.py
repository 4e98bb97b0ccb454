"""The score stage's metric registry: name -> ``Metric``. A new metric is one file plus one line here.

``METRICS[name](ScoreInputs(...), **params)`` scores whole arrays in memory; the stage streams the same
steps over a run (see ``score.base``)."""
from __future__ import annotations

from .base import Context, Metric, MetricOutput, ScoreInputs
from .clip_score import CLIP_SCORE
from .datacomp import CAPTION, IMAGE_SIZE, TEXT_MATCH
from .dbp import DBP
from .dp4tl import DP4TL_FM, DP4TL_LM
from .el2n import EL2N
from .random import RANDOM
from .semdedup import SEMDEDUP
from .ssp import SSP

METRICS: dict[str, Metric] = {m.name: m for m in (SSP, RANDOM, SEMDEDUP, DBP, DP4TL_LM, DP4TL_FM, EL2N,
                                                  CLIP_SCORE, CAPTION, IMAGE_SIZE, TEXT_MATCH)}

__all__ = ["METRICS", "Context", "Metric", "MetricOutput", "ScoreInputs"]
