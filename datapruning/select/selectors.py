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
from ..params import MAX_INT, parse_params, setting, show
from ..errors import ConfigError
from ..metrics.ccs import ccs_allocate, ccs_default_beta, ccs_strata
from ..metrics.dbp import dbp_quotas, dbp_shares
from ..metrics.dp4tl import grouping_note, top_k_groups
from ..hashing import uid_hash
from ..metrics.ranking import MODES, balanced_quotas, floor_quotas
from ..rows import ArrayRows, add
from ..score.dbp import cluster_complexity
from .threshold import ThresholdParams, decide_threshold
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
    """A registered selector: ``decide(rows, n, params, centroids, known) -> (rule, info)``. ``common`` names the
    ``select.*`` keys it reads (metric, mode, min_per_cluster, min_per_label); everything else is in ``params``.
    ``known``: values an earlier stage computed (``{"d_inter": {l: array}}`` from the score stage), or None."""

    name: str
    params: type
    decide: Callable
    common: tuple = ()

    def parse(self, raw: dict, common: dict) -> Any:
        """Typed parameters from ``select.params`` and the common ``select.*`` keys this selector reads."""
        fields = {f.name for f in dataclasses.fields(self.params)}
        unknown = sorted(set(raw) - fields, key=str)
        if unknown:
            raise ConfigError(f"unknown config key {show('select.params.' + str(unknown[0]))} for "
                              f"select.method={self.name}; accepted: {sorted(fields - set(self.common))}")
        for key, value in common.items():
            if key not in self.common and value not in (None, 0.0, "hard"):
                unset = f"--set select.{key}={'null' if key == 'metric' else 'hard' if key == 'mode' else 0}"
                raise ConfigError(f"config key 'select.{key}': {show(value)} means nothing to select.method="
                                  f"{self.name} (it reads {[f'select.{c}' for c in self.common] or 'none of them'});"
                                  f" unset it in the config or with {unset}")
        merged = {**{k: v for k, v in common.items() if k in self.common and v is not None}, **raw}
        keys = {k: f"select.{k}" for k in self.common if k not in raw}
        return parse_params(self.params, merged, "select.params", keys)

    def __call__(self, inp: SelectInputs, n: int, **raw) -> tuple[np.ndarray, dict]:
        """Select on arrays in memory: the keep mask and info."""
        common = {k: raw.pop(k) for k in ("metric", "mode", "min_per_cluster", "min_per_label") if k in raw}
        rows = input_rows(inp)
        rule, info = self.decide(rows, int(n), self.parse(raw, common), np.asarray(inp.centroids, np.float32))
        return rule(rows.block), info


@dataclass(frozen=True)
class RankParams:
    metric: str = "ssp"
    mode: str = setting("hard", choices=MODES)
    min_per_cluster: float = setting(0.0, ge=0.0, le=1.0)  # share of the budget spread evenly over clusters
    min_per_label: float = setting(0.0, ge=0.0, le=1.0)  # the same over labels


def rank_with_floors(rows, n: int, score: str, mode: str, floors=()) -> tuple[Callable, dict]:
    """Keep ``n`` rows by ``score``/``mode``, after floors: for each ``(group column, share)`` every group with rows
    in play first gets ``min(ceil(share * n / G), size)`` of its best rows. A row meeting any floor is kept;
    when the floors add up to more than ``n``, the preferred ``n`` of them win."""
    rules = []
    for group, share in floors:
        if share > 0:
            k = n_groups(rows, group)
            sizes = rows.reduce(partial(group_sizes, group, k), add)
            rules.append(top_per_group(rows, score, mode, group, floor_quotas(sizes, share, n), sizes=sizes))
    if not rules:
        return top_per_group(rows, score, mode, None, [n]), {}
    forced = partial(any_of, tuple(rules))
    n_forced = int(rows.reduce(partial(count_true, forced), add))
    if n_forced >= n:
        return top_per_group(rows, score, mode, None, [n], mask=forced), {"floor_rows": n_forced}
    rest = top_per_group(rows, score, mode, None, [n - n_forced], mask=partial(not_, forced))
    return partial(any_of, (forced, rest)), {"floor_rows": n_forced}


def decide_rank(rows, n: int, p: RankParams, centroids: np.ndarray, known: dict | None = None) -> tuple[Callable, dict]:
    """Global ranking by one metric, after optional floors per cluster and per label."""
    floors = [("cluster", p.min_per_cluster)]
    if p.min_per_label > 0 and rows.reduce(_has_labels, any):
        floors.append(("label", p.min_per_label))
    rule, info = rank_with_floors(rows, n, f"score_{p.metric}", p.mode, floors)
    return rule, {"metric": p.metric, "mode": p.mode, **info}


def _has_labels(block: dict) -> bool:
    return "label" in block and bool((block["label"] >= 0).any())


@dataclass(frozen=True)
class BalancedParams:
    metric: str = "ssp"
    mode: str = setting("hard", choices=MODES)
    by: str = setting("label", choices=("label", "cluster"))


def balanced(rows, n: int, score: str, mode: str, group: str) -> tuple[Callable, np.ndarray]:
    """The same count per group where sizes allow (``balanced_quotas``), ``mode`` within each group:
    (rule, quotas)."""
    sizes = rows.reduce(partial(group_sizes, group, n_groups(rows, group)), add)
    quotas = balanced_quotas(sizes, n)
    return top_per_group(rows, score, mode, group, quotas, sizes=sizes), quotas


def decide_balanced(rows, n: int, p: BalancedParams, centroids: np.ndarray, known: dict | None = None) -> tuple[Callable, dict]:
    """The same count per group (labels or clusters) where sizes allow, ``mode`` within each group."""
    if p.by == "label" and not rows.reduce(_has_labels, any):
        raise ConfigError("select.params.by=label needs labels, but the input has none")
    rule, quotas = balanced(rows, n, f"score_{p.metric}", p.mode, p.by)
    return rule, {"metric": p.metric, "mode": p.mode, "by": p.by, "quotas": quotas.tolist()}


@dataclass(frozen=True)
class DBPSelectParams:
    # within a cluster: hard = farthest from the centroid first (cos_dist), easy, random
    mode: str = setting("hard", choices=MODES)
    tau: float = setting(0.1, gt=0.0, le=1e6)
    l: int = setting(20, ge=1, le=MAX_INT)
    min_per_cluster: float = setting(0.0, ge=0.0, le=1.0)  # every cluster keeps at least floor(share * N / k)


def decide_dbp(rows, n: int, p: DBPSelectParams, centroids: np.ndarray, known: dict | None = None) -> tuple[Callable, dict]:
    """DBP: complexity from the rows in play (after SemDeDup), softmax shares, exact quotas with a floor per
    cluster, then within each cluster the first ``quota`` rows by cos_dist in ``mode``."""
    k = len(centroids)
    C, intra, inter, sizes = cluster_complexity(rows, centroids, p.l, (known or {}).get("d_inter", {}).get(p.l))
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
    beta: float | None = setting(None, ge=0.0, lt=1.0)  # hardest share dropped first; default from the prune rate
    strata: int = setting(50, ge=1, le=1 << 20)


def scored(score: str, block: dict) -> np.ndarray:
    return ~np.isnan(column(block, score))


def _range(score: str, pool: Callable, block: dict) -> tuple:
    s = column(block, score)[pool(block)]
    return (float(s.min()), float(s.max())) if len(s) else (np.inf, -np.inf)


def _merge_range(parts: list) -> tuple:
    return min(p[0] for p in parts), max(p[1] for p in parts)


def stratum(score: str, pool: Callable, lo: float, hi: float, strata: int, block: dict) -> dict:
    return {**block, "stratum": np.where(pool(block), ccs_strata(column(block, score), lo, hi, strata), -1)}


def decide_ccs(rows, n: int, p: CCSParams, centroids: np.ndarray, known: dict | None = None) -> tuple[Callable, dict]:
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
    lo, hi = rows.reduce(partial(_range, score, pool), _merge_range) if left else (0.0, 0.0)
    strat = partial(stratum, score, pool, lo, hi, int(p.strata))
    srows = rows.with_columns(strat)
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
    by: str | None = setting(None, choices=("label", "cluster"))  # default: what the metric scores (fm: cluster)
    keep_fraction_groups: float | None = setting(None, ge=0.0, le=1.0)  # keep this share of the groups instead


def _group_best(score: str, group: str, k: int, block: dict) -> np.ndarray:
    g = column(block, group)
    ok = in_play(block) & (g >= 0)
    best = np.full(k, -np.inf)
    np.maximum.at(best, g[ok], np.nan_to_num(column(block, score)[ok], nan=-np.inf))
    return best


def _max_arrays(parts: list) -> np.ndarray:
    return np.maximum.reduce(parts)


def decide_groups(rows, n: int, p: GroupsParams, centroids: np.ndarray, known: dict | None = None) -> tuple[Callable, dict]:
    """DP4TL: keep WHOLE groups (labels or clusters) by their best member score until the sample budget
    ``n`` (``top_k_groups``' rule), or the top ``keep_fraction_groups`` of the groups. ``by`` defaults to the
    grouping the metric scores: clusters for ``dp4tl_fm``, labels otherwise."""
    if p.by is None:
        p = dataclasses.replace(p, by="cluster" if p.metric == "dp4tl_fm" else "label")
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
    note, foreign = grouping_note(p.metric, p.by)
    log.log(logging.WARNING if foreign else logging.INFO, "select groups: %s", note)
    info.update({"metric": p.metric, "by": p.by, "grouping": note, "kept_ids": kept.tolist(), "n_requested": int(n),
                 "samples_kept": int(sizes[kept].sum())})
    return partial(in_groups, p.by, kept), info


SELECTORS: dict[str, Selector] = {
    "rank": Selector("rank", RankParams, decide_rank, ("metric", "mode", "min_per_cluster", "min_per_label")),
    "balanced": Selector("balanced", BalancedParams, decide_balanced, ("metric", "mode")),
    "dbp": Selector("dbp", DBPSelectParams, decide_dbp, ("mode", "min_per_cluster")),
    "ccs": Selector("ccs", CCSParams, decide_ccs, ("metric",)),
    "groups": Selector("groups", GroupsParams, decide_groups, ("metric",)),
    "threshold": Selector("threshold", ThresholdParams, decide_threshold, ("metric",)),
}
