"""Selection rules on whole arrays: scores -> keep flags (by count, hard/easy/random, group minimums).

Every rule ranks rows by one total order: ``(order_key(score, mode), tie, row)`` ascending, where ``tie``
is a seeded per-row hash (of the uid in the pipeline, of the row index here by default). The select stage
applies the same order shard by shard (``select.cutoffs``), so both give the same rows.
"""
from __future__ import annotations

import numpy as np

from .random import row_hash
from ..errors import ConfigError

MODES = ("hard", "easy", "random")
_TOP = np.uint64(1 << 63)


def order_key(scores: np.ndarray, mode: str) -> np.ndarray:
    """uint64 keys whose ascending order is keep preference: ``hard`` = largest score first, ``easy`` =
    smallest first, ``random`` = all equal (the tie key decides). NaN (unscored) sorts last; -0.0 == 0.0."""
    if mode not in MODES:
        raise ConfigError(f"select.mode must be one of {MODES}, got {mode!r}")
    s = np.asarray(scores, dtype=np.float64)
    if mode == "random":
        return np.zeros(len(s), dtype=np.uint64)
    v = (-s if mode == "hard" else s) + 0.0
    bits = v.view(np.uint64)
    key = np.where(bits & _TOP, ~bits, bits | _TOP)
    key[np.isnan(s)] = np.uint64(0xFFFFFFFFFFFFFFFF)
    return key


def keep_count(n_total: int, keep_fraction: float | None, keep_count: int | None) -> int:
    """The number of samples to keep; exactly one of fraction or count must be given."""
    if (keep_fraction is None) == (keep_count is None):
        raise ConfigError("select: give exactly one of select.keep_fraction or select.keep_count")
    if keep_count is not None:
        if keep_count < 0:
            raise ConfigError(f"select.keep_count must be >= 0, got {keep_count}")
        return min(int(keep_count), n_total)
    if not 0.0 <= keep_fraction <= 1.0:
        raise ConfigError(f"select.keep_fraction must be in [0, 1], got {keep_fraction}")
    return int(round(keep_fraction * n_total))


def rank_order(scores: np.ndarray, mode: str, seed: int, tie: np.ndarray | None = None) -> np.ndarray:
    """Indices in keep-preference order: ``hard`` = largest score first, ``easy`` = smallest first,
    ``random`` = seeded shuffle. Ties break by ``tie`` (default: a seeded hash of the row index), then by
    row, so the order is total."""
    key = order_key(scores, mode)
    tie = row_hash(len(key), seed) if tie is None else np.asarray(tie, dtype=np.uint64)
    return np.lexsort((np.arange(len(key)), tie, key))


def select_top(scores: np.ndarray, n: int, mode: str, seed: int, eligible: np.ndarray | None = None,
               tie: np.ndarray | None = None) -> np.ndarray:
    """Keep the ``n`` best rows by ``mode`` among ``eligible``. Returns a bool mask."""
    keep = np.zeros(len(scores), dtype=bool)
    order = rank_order(scores, mode, seed, tie)
    if eligible is not None:
        order = order[np.asarray(eligible, dtype=bool)[order]]
    keep[order[: max(0, min(n, len(order)))]] = True
    return keep


def group_minimums(groups: np.ndarray, min_share: float, n: int, eligible: np.ndarray) -> np.ndarray:
    """Per-group floor ``min(ceil(min_share * n / G), |group|)`` over the eligible rows, for G groups."""
    ids, sizes = np.unique(groups[eligible], return_counts=True)
    floor = np.zeros(int(groups.max()) + 1 if len(groups) else 0, dtype=np.int64)
    if len(ids) and min_share > 0:
        want = int(np.ceil(min_share * n / len(ids)))
        floor[ids] = np.minimum(want, sizes)
    return floor


def _rank_within_groups(order: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """For rows ``order`` (in preference order), each row's 0-based position inside its group."""
    sorted_groups = groups[order]
    by_group = np.argsort(sorted_groups, kind="stable")
    starts = np.searchsorted(sorted_groups[by_group], sorted_groups[by_group])
    rank = np.empty(len(order), dtype=np.int64)
    rank[by_group] = np.arange(len(order)) - starts
    return rank


def keep_by_quota(scores, groups, quotas, mode, seed, eligible=None, tie=None) -> np.ndarray:
    """Within each group g keep ``quotas[g]`` rows by ``mode`` (used by DBP and class balance).
    Rows with a negative group are never kept."""
    groups = np.asarray(groups, dtype=np.int64)
    eligible = np.ones(len(groups), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    order = rank_order(scores, mode, seed, tie)
    order = order[eligible[order] & (groups[order] >= 0)]
    quotas = np.asarray(quotas, dtype=np.int64)
    keep = np.zeros(len(groups), dtype=bool)
    keep[order[_rank_within_groups(order, groups) < quotas[groups[order]]]] = True
    return keep


def select_with_minimums(scores, n, mode, seed, groups=None, min_share=0.0, eligible=None,
                         floors=(), tie=None) -> np.ndarray:
    """Keep ``n`` rows by ``mode``, but first give every group (cluster or label) its floor of
    ``ceil(min_share * n / G)`` rows, taken by the same rule within the group. ``min_share`` in [0, 1].
    ``floors`` adds more (groups, min_share) pairs: a row meeting any floor is forced. When the forced rows
    add up to more than ``n``, the preferred rows among them win."""
    eligible = np.ones(len(scores), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    forced = np.zeros(len(scores), dtype=bool)
    for grp, share in ((groups, min_share), *floors):
        if grp is None or share <= 0:
            continue
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"select: minimum share must be in [0, 1], got {share}")
        grp = np.asarray(grp, dtype=np.int64)
        forced |= keep_by_quota(scores, grp, group_minimums(grp, share, n, eligible & (grp >= 0)), mode, seed,
                                eligible, tie)
    if forced.sum() > n:  # floors exceed the budget: keep the preferred n of the forced rows
        return select_top(scores, n, mode, seed, forced, tie)
    return forced | select_top(scores, n - int(forced.sum()), mode, seed, eligible & ~forced, tie)


def class_balanced_quotas(groups: np.ndarray, n: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """Split ``n`` as evenly as possible over groups, capped by group size (water-filling);
    leftover from small groups flows to larger ones. Returns quotas indexed by group id."""
    groups = np.asarray(groups, dtype=np.int64)
    eligible = np.ones(len(groups), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    return balanced_quotas(np.bincount(groups[eligible & (groups >= 0)], minlength=int(groups.max(initial=-1)) + 1), n)


def balanced_quotas(sizes: np.ndarray, n: int) -> np.ndarray:
    """``class_balanced_quotas`` from the group sizes alone."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = min(int(n), int(sizes.sum()))
    quotas = np.zeros_like(sizes)
    left, open_ = n, sizes > 0
    while left > 0 and open_.any():
        ids = np.flatnonzero(open_)
        share = left // len(ids)
        if share == 0:  # fewer units than open groups: the lowest ids get one each (deterministic)
            quotas[ids[:left]] += 1
            break
        add = np.minimum(share, sizes[ids] - quotas[ids])
        quotas[ids] += add
        left -= int(add.sum())
        open_ = quotas < sizes
    return quotas


def select_class_balanced(scores, n, mode, seed, groups, eligible=None, tie=None) -> np.ndarray:
    """Keep ``n`` rows with the same count per group where sizes allow, ``mode`` within each group."""
    quotas = class_balanced_quotas(groups, n, eligible)
    return keep_by_quota(scores, groups, quotas, mode, seed, eligible, tie)
