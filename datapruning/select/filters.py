"""Score filters before any selector (``select.filters``): rows below a threshold, or outside a top fraction, drop out.

``select.filters: {clip_score: {keep_fraction: 0.3}, caption: {threshold: 1}}`` keeps the rows that pass every
filter; each filter is decided on all rows of the run, so the order of filters does not matter (DataComp's
intersection baselines). ``threshold: t`` keeps scores >= t. ``keep_fraction: f`` is DataComp's rule: the
threshold is the score at position ``int(N * f)`` of the N scored rows sorted from the highest (ties at it
kept). Unscored (NaN) rows never pass. The rows left are in play for the selector, as after ``select.dedup_eps``.
See docs/methods.md#clip-score-and-datacomps-filtering-baselines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..errors import ConfigError, StageError
from ..params import parse_params, setting, show
from ..rows import add
from .rules import column, count_true, top_per_group


@dataclass(frozen=True)
class FilterParams:
    threshold: float | None = setting(None)  # keep rows scoring at least this ...
    keep_fraction: float | None = setting(None, ge=0.0, le=1.0)  # ... or DataComp's top fraction


def parse_filters(raw, metrics) -> dict[str, FilterParams]:
    """``select.filters`` as {metric: FilterParams}; each filter's metric must be in ``score.metrics``."""
    out = {}
    for name, params in dict(raw or {}).items():
        where = f"select.filters.{name}"
        if name not in metrics:
            raise ConfigError(f"config key {show(where)}: {show(name)} is not in score.metrics {list(metrics)}; "
                              "add it there")
        out[name] = filter_params(params, where)
    return out


def filter_params(raw, where: str) -> FilterParams:
    """One filter's typed parameters: exactly one of ``threshold`` and ``keep_fraction``."""
    p = parse_params(FilterParams, raw, where)
    given = [k for k in ("threshold", "keep_fraction") if getattr(p, k) is not None]
    if len(given) != 1:
        raise ConfigError(f"config key {show(where)}: give one of threshold and keep_fraction, got {given or 'neither'}")
    return p


def scored(score: str, block: dict) -> np.ndarray:
    return ~np.isnan(column(block, score))


def at_least(score: str, threshold: float, block: dict) -> np.ndarray:
    """Rows whose ``score`` is >= ``threshold`` (NaN never is)."""
    with np.errstate(invalid="ignore"):
        return column(block, score) >= threshold


def _min_kept(score: str, rule, block: dict) -> float:
    s = column(block, score)[rule(block)]
    return float(s.min()) if len(s) else math.inf


def fraction_threshold(rows, score: str, fraction: float) -> float:
    """DataComp's threshold for a top ``fraction``: the score at position int(N * fraction) of the N scored rows
    sorted from the highest; -inf when that is past the last row (every scored row passes)."""
    n = int(rows.reduce(partial(count_true, partial(scored, score)), add) or 0)
    at = int(n * fraction)
    if at >= n:
        return -math.inf
    best = top_per_group(rows, score, "hard", None, [at + 1], mask=partial(scored, score))
    return float(rows.reduce(partial(_min_kept, score, best), min))


def passes(tests: tuple, block: dict) -> np.ndarray:
    out = np.ones(len(block["pos"]), dtype=bool)
    for test in tests:
        out &= test(block)
    return out


def filtered(before, tests: tuple, block: dict) -> dict:
    """The block with ``eligible``: the rows in play after ``before`` (the dedup step, or None) that pass."""
    block = before(block) if before is not None else block
    ok = passes(tests, block)
    return {**block, "eligible": block["eligible"] & ok if "eligible" in block else ok}


def _eligible(block: dict) -> int:
    return int(np.count_nonzero(block["eligible"]))


def with_filters(rows, scfg, metrics, before=None) -> tuple:
    """The eligibility step for ``select.filters`` after ``before`` (the dedup step or None), and its info:
    per filter the threshold used and the rows it passes alone, then the rows left in play (``kept``).
    Without filters: ``(before, {})``."""
    filters = parse_filters(scfg.filters, metrics)
    if not filters:
        return before, {}
    if rows.n and not all(rows.reduce(partial(_has, f"score_{name}"), all) for name in filters):
        raise StageError(f"select.filters: the scores of {sorted(filters)} are missing; rerun 'datapruning score'")
    tests, info = [], {}
    for name, p in filters.items():
        score = f"score_{name}"
        t = float(p.threshold) if p.threshold is not None else fraction_threshold(rows, score, p.keep_fraction)
        test = partial(at_least, score, t)
        tests.append(test)
        info[name] = {"threshold": t if math.isfinite(t) else None,
                      "passed": int(rows.reduce(partial(count_true, test), add) or 0),
                      **({"keep_fraction": p.keep_fraction} if p.keep_fraction is not None else {})}
    step = partial(filtered, before, tuple(tests))
    kept = int(rows.with_columns(step).reduce(_eligible, add) or 0) if rows.n else 0
    return step, {"by_metric": info, "kept": kept, "removed": rows.n - kept}


def filter_mask(scores, threshold: float | None = None, keep_fraction: float | None = None) -> np.ndarray:
    """One filter on an array in memory (the stage's code over one block): True where a score passes."""
    from ..rows import ArrayRows

    filter_params({"threshold": threshold, "keep_fraction": keep_fraction}, "filter_mask")
    s = np.asarray(scores, dtype=np.float64)
    rows = ArrayRows({"score_x": s})
    t = float(threshold) if threshold is not None else fraction_threshold(rows, "score_x", keep_fraction)
    return at_least("score_x", t, rows.block)


def _has(name: str, block: dict) -> bool:
    return name in block
