"""Random as a pipeline metric: seeded uniform scores keyed by uid (docs/methods.md#random-seeded-baseline)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..metrics.random import random_scores
from .base import Metric
from ..params import MAX_INT, setting


@dataclass(frozen=True)
class RandomParams:
    seed: int | None = setting(None, ge=0, le=MAX_INT)  # default: the run seed


def score(block: dict, state: dict, params: RandomParams) -> np.ndarray:
    return random_scores(block["uid"], params.seed)


def summarize(rows, params: RandomParams, state: dict) -> dict:
    return {"seed": int(params.seed)}


RANDOM = Metric("random", RandomParams, score, summarize=summarize)
