"""The threshold selector: keep the rows whose score reaches ``select.params.threshold`` (DataComp's "CLIP score >= 0.28").

``select.method: threshold`` with ``select.metric`` (default clip_score) keeps every row in play scoring at least
the threshold, at most ``select.keep_fraction`` / ``keep_count`` of the run (the highest first), so
``keep_fraction: 1.0`` keeps them all. See docs/methods.md#clip-score-and-datacomps-filtering-baselines.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..errors import ConfigError
from ..params import setting
from ..rows import add
from .filters import at_least
from .rules import count_true, in_play, top_per_group


@dataclass(frozen=True)
class ThresholdParams:
    metric: str = "clip_score"
    threshold: float | None = setting(None)

    def check(self):
        if self.threshold is None:
            raise ConfigError("config key 'select.params.threshold': select.method=threshold needs a number")


def passing(score: str, threshold: float, block: dict):
    return in_play(block) & at_least(score, threshold, block)


def decide_threshold(rows, n: int, p: ThresholdParams, centroids, known: dict | None = None) -> tuple:
    """Rows in play scoring >= the threshold; the ``n`` highest of them where more pass."""
    score = f"score_{p.metric}"
    test = partial(passing, score, float(p.threshold))
    passed = int(rows.reduce(partial(count_true, test), add) or 0)
    rule = top_per_group(rows, score, "hard", None, [n], mask=test)
    return rule, {"metric": p.metric, "threshold": float(p.threshold), "passed": passed, "n_requested": int(n),
                  "n_kept": min(int(n), passed)}
