"""Selectors: the select stage's registered rules, turning scores into keep flags (docs/methods.md)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..metrics.ccs import ccs_default_beta, ccs_keep
from ..metrics.dbp import cluster_complexity, dbp_quotas, dbp_shares
from ..metrics.dp4tl import top_k_groups
from ..metrics.ranking import class_balanced_quotas, keep_by_quota, select_with_minimums

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectInputs:
    """Columns the select step sees, aligned by row. ``scores`` maps metric name -> float64 [N].

    ``eligible`` marks rows still in play after filters such as SemDeDup (all True by default).
    """

    uid: np.ndarray
    cluster: np.ndarray
    cos_dist: np.ndarray
    centroids: np.ndarray
    scores: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    eligible: np.ndarray | None = None
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)


# A selector: (SelectInputs, n_keep, **params) -> (keep mask, info dict)
Selector = Callable[..., tuple[np.ndarray, dict]]


def metric_scores(inp: SelectInputs, metric: str) -> np.ndarray:
    """The scores of ``metric`` (float64 [N]); a one-line error naming the metrics the score stage ran."""
    if metric not in inp.scores:
        raise ValueError(f"select.metric: no scores for {metric!r}; the score stage ran {sorted(inp.scores)}")
    return np.asarray(inp.scores[metric], dtype=np.float64)


def select_rank(inp: SelectInputs, n: int, metric: str = "ssp", mode: str = "hard",
                min_per_cluster: float = 0.0, min_per_label: float = 0.0) -> tuple[np.ndarray, dict]:
    """Global ranking by one metric, with optional minimum shares per cluster and per label."""
    labels = (inp.labels, min_per_label) if inp.labels is not None else (None, 0.0)
    keep = select_with_minimums(metric_scores(inp, metric), n, mode, inp.seed, inp.cluster, min_per_cluster,
                                inp.eligible, floors=(labels,))
    return keep, {"metric": metric, "mode": mode}


def select_balanced(inp: SelectInputs, n: int, metric: str = "ssp", mode: str = "hard",
                    by: str = "label") -> tuple[np.ndarray, dict]:
    """Class-balanced (``by: label``) or cluster-balanced (``by: cluster``) selection with any metric."""
    if by == "label":
        if inp.labels is None:
            raise ValueError("select.params.by=label needs labels, but the input has none")
        groups = inp.labels
    elif by == "cluster":
        groups = inp.cluster
    else:
        raise ValueError(f"select.params.by must be 'label' or 'cluster', got {by!r}")
    quotas = class_balanced_quotas(groups, n, inp.eligible)
    keep = keep_by_quota(metric_scores(inp, metric), groups, quotas, mode, inp.seed, inp.eligible)
    return keep, {"metric": metric, "mode": mode, "by": by, "quotas": quotas.tolist()}


def select_dbp(inp: SelectInputs, n: int, mode: str = "hard", tau: float = 0.1, l: int = 20,
               min_per_cluster: int = 0, metric: str | None = None) -> tuple[np.ndarray, dict]:
    """DBP selector: complexity from the ELIGIBLE rows (run after SemDeDup), softmax shares, exact
    quotas, then within each cluster keep ``quota`` rows by ``mode`` on ``cos_dist`` (or on
    ``inp.scores[metric]``). ``n`` above the eligible count is capped, with a warning."""
    cluster = np.asarray(inp.cluster, dtype=np.int64)
    eligible = np.ones(len(cluster), bool) if inp.eligible is None else np.asarray(inp.eligible, bool)
    k = len(inp.centroids)
    C, intra, inter = cluster_complexity(inp.cos_dist, cluster, inp.centroids, l, eligible)
    sizes = np.bincount(cluster[eligible & (cluster >= 0)], minlength=k)
    n_keep = min(int(n), int(sizes.sum()))
    if n_keep < n:
        log.warning("dbp: asked for %d rows but only %d are eligible; keeping all of them", n, n_keep)
    shares = dbp_shares(C, tau)
    quotas = dbp_quotas(n_keep, shares, sizes, min_per_cluster)
    scores = np.asarray(inp.cos_dist, dtype=np.float64) if metric is None else metric_scores(inp, metric)
    keep = keep_by_quota(scores, cluster, quotas, mode, inp.seed, eligible)
    info = {"mode": mode, "tau": float(tau), "l": int(l), "metric": metric or "cos_dist",
            "n_requested": int(n), "n_kept": int(keep.sum()), "quotas": quotas.tolist(),
            "shares": shares.tolist(), "complexity": C.tolist(), "d_intra": intra.tolist(),
            "d_inter": inter.tolist(), "sizes": sizes.tolist()}
    return keep, info


def select_ccs(inp: SelectInputs, n: int, metric: str = "el2n", beta: float | None = None,
               strata: int = 50) -> tuple[np.ndarray, dict]:
    """CCS selector. ``beta`` defaults to ``ccs_default_beta(1 - n / scored eligible rows)``."""
    scores = metric_scores(inp, metric)
    valid = ~np.isnan(scores) if inp.eligible is None else ~np.isnan(scores) & np.asarray(inp.eligible, bool)
    total = int(valid.sum())
    if beta is None:
        beta = ccs_default_beta(1.0 - min(int(n), total) / total) if total else 0.0
    keep, info = ccs_keep(scores, int(n), beta, strata, inp.seed, valid)
    info.update({"metric": metric, "n_requested": int(n), "n_kept": int(keep.sum())})
    return keep, info


def select_groups(inp: SelectInputs, n: int, metric: str = "dp4tl_lm", by: str = "label",
                  keep_fraction_groups: float | None = None) -> tuple[np.ndarray, dict]:
    """Keep WHOLE groups (labels or clusters) with the highest group score (the max of its members'
    ``metric`` scores) until the sample budget ``n`` (see ``top_k_groups`` for the rule), or the top
    ``keep_fraction_groups`` of the groups when given (then ``n`` is ignored). Eligible rows only."""
    if by not in ("label", "cluster"):
        raise ValueError(f"select.params.by must be 'label' or 'cluster', got {by!r}")
    if by == "label" and inp.labels is None:
        raise ValueError("select.params.by=label needs labels, but the input has none")
    raw = metric_scores(inp, metric)
    groups = np.asarray(inp.labels if by == "label" else inp.cluster, dtype=np.int64)
    eligible = np.ones(len(groups), bool) if inp.eligible is None else np.asarray(inp.eligible, bool)
    rows = eligible & (groups >= 0)
    sizes = np.bincount(groups[rows], minlength=int(groups.max(initial=-1)) + 1)
    present = np.flatnonzero(sizes)  # groups with eligible rows; scored by their members' best score
    group_score = np.full(len(sizes), -np.inf)
    scores = np.nan_to_num(raw, nan=-np.inf)
    np.maximum.at(group_score, groups[rows], scores[rows])
    budget = {"keep_fraction": keep_fraction_groups} if keep_fraction_groups is not None else {"sample_budget": int(n)}
    local, info = top_k_groups(group_score[present], group_sizes=sizes[present], **budget)
    kept = present[local]
    keep = rows & np.isin(groups, kept)
    info.update({"metric": metric, "by": by, "kept_ids": kept.tolist(), "n_requested": int(n),
                 "samples_kept": int(keep.sum())})
    return keep, info
