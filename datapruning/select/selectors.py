"""Selectors: the select stage's rules, each with typed parameters, run over rows seen block by block.

A selector decides from a few passes (counts, per-group sums, exact per-group cutoffs) and returns a
*rule*: a small picklable function from a block to its keep flags, which the stage applies shard by shard.
``Selector.__call__(SelectInputs, n, **params)`` runs the same code on arrays in memory.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np

from ..cutoffs import Cutoffs, find_cutoffs
from ..config import show, typed_params
from ..errors import ConfigError
from ..metrics.ccs import ccs_allocate, ccs_default_beta
from ..metrics.dbp import dbp_quotas, dbp_shares
from ..metrics.dp4tl import top_k_groups
from ..metrics.random import uid_hash
from ..metrics.ranking import MODES, balanced_quotas
from ..rows import ArrayRows, add
from ..score.dbp import cluster_complexity
from .rules import (any_of, column, count_true, group_sizes, in_groups, in_play, keys_by, n_groups, not_,
                    top_per_group)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectInputs:
    """Whole arrays for selecting in memory, aligned by row. ``scores`` maps metric name -> float64 [N];
    ``eligible`` marks rows still in play after filters such as SemDeDup (all True by default)."""

    uid: np.ndarray
    cluster: np.ndarray
    cos_dist: np.ndarray
    centroids: np.ndarray
    scores: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    eligible: np.ndarray | None = None
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def input_rows(inp: SelectInputs) -> ArrayRows:
    cols = {"cluster": np.asarray(inp.cluster, dtype=np.int64),
            "cos_dist": np.asarray(inp.cos_dist, dtype=np.float32).astype(np.float64)}
    if inp.uid is not None:
        cols["tie"] = uid_hash(np.asarray(inp.uid, dtype=object).astype(str), inp.seed)
    if inp.labels is not None:
        cols["label"] = np.asarray(inp.labels, dtype=np.int64)
    for name, s in inp.scores.items():
        cols[f"score_{name}"] = np.asarray(s, dtype=np.float64)
    if inp.eligible is not None:
        cols["eligible"] = np.asarray(inp.eligible, dtype=bool)
    return ArrayRows(cols, inp.seed)



# ---- the selectors --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selector:
    """A registered selector: ``decide(rows, n, params, centroids) -> (rule, info)``. ``common`` names the ``select.*``
    keys it reads (metric, mode, min_per_cluster, min_per_label); everything else is in ``params``."""

    name: str
    params: type
    decide: Callable
    common: tuple = ()

    def parse(self, raw: dict, common: dict) -> Any:
        fields = {f.name for f in dataclasses.fields(self.params)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ConfigError(f"select.params: unknown key {show(unknown[0])} for select.method={self.name}; "
                              f"accepted: {sorted(fields - set(self.common))}")
        for key, value in common.items():
            if key not in self.common and value not in (None, 0.0, "hard"):
                raise ConfigError(f"select.{key}={show(value)} means nothing to select.method={self.name}; "
                                  f"it reads {[f'select.{c}' for c in self.common] or 'none of the common keys'}")
        merged = {**{k: v for k, v in common.items() if k in self.common and v is not None}, **raw}
        return typed_params(self.params, merged, f"select.params for {self.name}")

    def __call__(self, inp: SelectInputs, n: int, **raw) -> tuple[np.ndarray, dict]:
        """Select on arrays in memory: the keep mask and info."""
        common = {k: raw.pop(k) for k in ("metric", "mode", "min_per_cluster", "min_per_label") if k in raw}
        rows = input_rows(inp)
        rule, info = self.decide(rows, int(n), self.parse(raw, common), np.asarray(inp.centroids, np.float32))
        return rule(rows.block), info


def _check_mode(key: str, mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"{key}: expected one of {list(MODES)}, got {show(mode)}")


def _check_share(key: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}: a share of the budget in [0, 1], got {show(value)}")


@dataclass(frozen=True)
class RankParams:
    metric: str = "ssp"
    mode: str = "hard"
    min_per_cluster: float = 0.0  # share of the budget spread evenly over clusters as a floor
    min_per_label: float = 0.0  # the same over labels

    def check(self):
        _check_mode("select.mode", self.mode)
        _check_share("select.min_per_cluster", self.min_per_cluster)
        _check_share("select.min_per_label", self.min_per_label)


def floor_quotas(sizes: np.ndarray, share: float, n: int) -> np.ndarray:
    """Per-group floor ``min(ceil(share * n / G), size)`` over the G groups with rows in play."""
    present = sizes > 0
    if not present.any() or share <= 0:
        return np.zeros(len(sizes), np.int64)
    return np.where(present, np.minimum(int(np.ceil(share * n / present.sum())), sizes), 0)


def decide_rank(rows, n: int, p: RankParams, centroids: np.ndarray) -> tuple[Callable, dict]:
    """Global ranking by one metric, after optional floors per cluster and per label."""
    score = f"score_{p.metric}"
    floors = []
    for group, share in (("cluster", p.min_per_cluster), ("label", p.min_per_label)):
        if share > 0 and (group != "label" or rows.reduce(_has_labels, any)):
            k = n_groups(rows, group)
            sizes = rows.reduce(partial(group_sizes, group, k), add)
            floors.append(top_per_group(rows, score, p.mode, group, floor_quotas(sizes, share, n), sizes=sizes))
    info = {"metric": p.metric, "mode": p.mode}
    if not floors:
        return top_per_group(rows, score, p.mode, None, [n]), info
    forced = partial(any_of, tuple(floors))
    n_forced = int(rows.reduce(partial(count_true, forced), add))
    info["floor_rows"] = n_forced
    if n_forced >= n:  # floors exceed the budget: the preferred n of the forced rows
        return top_per_group(rows, score, p.mode, None, [n], mask=forced), info
    rest = top_per_group(rows, score, p.mode, None, [n - n_forced], mask=partial(not_, forced))
    return partial(any_of, (forced, rest)), info


def _has_labels(block: dict) -> bool:
    return "label" in block and bool((block["label"] >= 0).any())


@dataclass(frozen=True)
class BalancedParams:
    metric: str = "ssp"
    mode: str = "hard"
    by: str = "label"  # label | cluster

    def check(self):
        _check_mode("select.mode", self.mode)
        if self.by not in ("label", "cluster"):
            raise ConfigError(f"select.params.by: expected 'label' or 'cluster', got {self.by!r}")


def decide_balanced(rows, n: int, p: BalancedParams, centroids: np.ndarray) -> tuple[Callable, dict]:
    """The same count per group (labels or clusters) where sizes allow, ``mode`` within each group."""
    if p.by == "label" and not rows.reduce(_has_labels, any):
        raise ConfigError("select.params.by=label needs labels, but the input has none")
    k = n_groups(rows, p.by)
    sizes = rows.reduce(partial(group_sizes, p.by, k), add)
    quotas = balanced_quotas(sizes, n)
    rule = top_per_group(rows, f"score_{p.metric}", p.mode, p.by, quotas, sizes=sizes)
    return rule, {"metric": p.metric, "mode": p.mode, "by": p.by, "quotas": quotas.tolist()}


@dataclass(frozen=True)
class DBPSelectParams:
    mode: str = "hard"  # within a cluster: hard = farthest from the centroid first (cos_dist), easy, random
    tau: float = 0.1
    l: int = 20
    min_per_cluster: float = 0.0  # share of the budget: every cluster keeps at least floor(share * N / k)

    def check(self):
        _check_mode("select.mode", self.mode)
        _check_share("select.min_per_cluster", self.min_per_cluster)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau > 0:
            raise ConfigError(f"select.params.tau: must be > 0, got {self.tau!r}")
        if isinstance(self.l, bool) or not isinstance(self.l, int) or self.l < 1:
            raise ConfigError(f"select.params.l: must be an integer >= 1, got {self.l!r}")


def decide_dbp(rows, n: int, p: DBPSelectParams, centroids: np.ndarray) -> tuple[Callable, dict]:
    """DBP: complexity from the rows in play (after SemDeDup), softmax shares, exact quotas with a floor per
    cluster, then within each cluster the first ``quota`` rows by cos_dist in ``mode``."""
    k = len(centroids)
    C, intra, inter, sizes = cluster_complexity(rows, centroids, p.l)
    n_keep = min(int(n), int(sizes.sum()))
    if n_keep < n:
        log.warning("dbp: asked for %d rows but only %d are eligible; keeping all of them", n, n_keep)
    floor = int(np.floor(p.min_per_cluster * n_keep / k))
    shares = dbp_shares(C, p.tau)
    quotas = dbp_quotas(n_keep, shares, sizes, floor)
    rule = top_per_group(rows, "cos_dist", p.mode, "cluster", quotas, sizes=sizes)
    info = {"mode": p.mode, "tau": float(p.tau), "l": int(p.l), "order": "cos_dist", "floor_per_cluster": floor,
            "n_requested": int(n), "n_kept": int(quotas.sum()), "quotas": quotas.tolist(), "shares": shares.tolist(),
            "complexity": C.tolist(), "d_intra": intra.tolist(), "d_inter": inter.tolist(), "sizes": sizes.tolist()}
    return rule, info


@dataclass(frozen=True)
class CCSParams:
    metric: str = "el2n"
    beta: float | None = None  # hardest share dropped first; default from the prune rate (ccs_default_beta)
    strata: int = 50

    def check(self):
        if self.beta is not None and not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"select.params.beta: must be in [0, 1), got {self.beta!r}")
        if isinstance(self.strata, bool) or not isinstance(self.strata, int) or self.strata < 1:
            raise ConfigError(f"select.params.strata: must be an integer >= 1, got {self.strata!r}")


def scored(score: str, block: dict) -> np.ndarray:
    return ~np.isnan(column(block, score))


def _range(score: str, pool: Callable, block: dict) -> tuple:
    s = column(block, score)[pool(block)]
    return (float(s.min()), float(s.max())) if len(s) else (np.inf, -np.inf)


def _merge_range(parts: list) -> tuple:
    return min(p[0] for p in parts), max(p[1] for p in parts)


def stratum(score: str, pool: Callable, lo: float, width: float, strata: int, block: dict) -> dict:
    s = column(block, score)
    pos = np.floor((s - lo) / width) if width > 0 else np.zeros(len(s))
    st = np.clip(np.nan_to_num(pos, nan=0.0), 0, strata - 1).astype(np.int64)  # the maximum joins the top stratum
    return {**block, "stratum": np.where(pool(block), st, -1)}


def decide_ccs(rows, n: int, p: CCSParams, centroids: np.ndarray) -> tuple[Callable, dict]:
    """CCS: drop the hardest ``beta`` share of the scored rows, cut the rest into equal-width score strata,
    give the budget out from the smallest stratum up, and sample uniformly (by the seeded tie key) within."""
    score = f"score_{p.metric}"
    valid = partial(scored, score)
    total = int(rows.reduce(partial(count_true, partial(_and_in_play, valid)), add))
    beta = p.beta if p.beta is not None else (ccs_default_beta(1.0 - min(n, total) / total) if total else 0.0)
    n_drop = int(beta * total)
    dropped = top_per_group(rows, score, "hard", None, [n_drop], mask=valid)
    pool = partial(_pool, valid, dropped)
    left = total - n_drop
    if not 0 <= n <= left:
        raise ConfigError(f"ccs: cannot keep {n} rows: {left} remain after dropping the hardest {n_drop} "
                         f"(beta={beta}) of {total} scored rows")
    lo, hi = rows.reduce(partial(_range, score, pool), _merge_range)
    width = (hi - lo) / p.strata if left else 0.0
    strat = partial(stratum, score, pool, lo, width, int(p.strata))
    from ..rows import with_columns

    srows = with_columns(rows, strat)
    sizes = srows.reduce(partial(group_sizes, "stratum", int(p.strata)), add)
    alloc = ccs_allocate(sizes, int(n))
    keys = partial(keys_by, None, "random", "stratum", None)
    cut = find_cutoffs(srows, keys, alloc, sizes)
    info = {"metric": p.metric, "beta": float(beta), "strata": int(p.strata), "dropped_hard": n_drop,
            "stratum_sizes": sizes.tolist(), "stratum_kept": alloc.tolist(), "n_requested": int(n),
            "n_kept": int(alloc.sum())}
    return partial(_stratum_keep, strat, cut, keys), info


def _and_in_play(mask: Callable, block: dict) -> np.ndarray:
    return in_play(block) & mask(block)


def _pool(valid: Callable, dropped: Callable, block: dict) -> np.ndarray:
    return in_play(block) & valid(block) & ~dropped(block)


def _stratum_keep(strat: Callable, cut: Cutoffs, keys: Callable, block: dict) -> np.ndarray:
    return cut.keep(*keys(strat(block)))


@dataclass(frozen=True)
class GroupsParams:
    metric: str = "dp4tl_lm"
    by: str = "label"  # label | cluster
    keep_fraction_groups: float | None = None  # keep this share of the groups instead of a sample budget

    def check(self):
        if self.by not in ("label", "cluster"):
            raise ConfigError(f"select.params.by: expected 'label' or 'cluster', got {self.by!r}")
        if self.keep_fraction_groups is not None:
            _check_share("select.params.keep_fraction_groups", self.keep_fraction_groups)


def _group_best(score: str, group: str, k: int, block: dict) -> np.ndarray:
    g = column(block, group)
    ok = in_play(block) & (g >= 0)
    best = np.full(k, -np.inf)
    np.maximum.at(best, g[ok], np.nan_to_num(column(block, score)[ok], nan=-np.inf))
    return best


def _max_arrays(parts: list) -> np.ndarray:
    return np.maximum.reduce(parts)


def decide_groups(rows, n: int, p: GroupsParams, centroids: np.ndarray) -> tuple[Callable, dict]:
    """DP4TL: keep WHOLE groups (labels or clusters) by their best member score until the sample budget
    ``n`` (``top_k_groups``' rule), or the top ``keep_fraction_groups`` of the groups."""
    if p.by == "label" and not rows.reduce(_has_labels, any):
        raise ConfigError("select.params.by=label needs labels, but the input has none")
    score = f"score_{p.metric}"
    k = n_groups(rows, p.by)
    sizes = rows.reduce(partial(group_sizes, p.by, k), add)
    best = rows.reduce(partial(_group_best, score, p.by, k), _max_arrays)
    present = np.flatnonzero(sizes)
    budget = ({"keep_fraction": p.keep_fraction_groups} if p.keep_fraction_groups is not None
              else {"sample_budget": int(n)})
    local, info = top_k_groups(best[present], group_sizes=sizes[present], **budget)
    kept = present[local]
    info.update({"metric": p.metric, "by": p.by, "kept_ids": kept.tolist(), "n_requested": int(n),
                 "samples_kept": int(sizes[kept].sum())})
    return partial(in_groups, p.by, kept), info


SELECTORS: dict[str, Selector] = {
    "rank": Selector("rank", RankParams, decide_rank, ("metric", "mode", "min_per_cluster", "min_per_label")),
    "balanced": Selector("balanced", BalancedParams, decide_balanced, ("metric", "mode")),
    "dbp": Selector("dbp", DBPSelectParams, decide_dbp, ("mode", "min_per_cluster")),
    "ccs": Selector("ccs", CCSParams, decide_ccs, ("metric",)),
    "groups": Selector("groups", GroupsParams, decide_groups, ("metric",)),
}
