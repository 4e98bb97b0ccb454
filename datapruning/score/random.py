"""Random as a pipeline metric: seeded uniform scores keyed by uid (docs/methods.md#random)."""
from __future__ import annotations

from ..metrics.random import random_scores
from .base import MetricOutput, ScoreInputs


def score_random(inp: ScoreInputs, seed: int | None = None) -> MetricOutput:
    """Pipeline adapter: ``seed`` defaults to the run seed."""
    seed = inp.seed if seed is None else seed
    return MetricOutput(random_scores(inp.uid, seed), {"seed": int(seed)})
