"""The selection rules on numpy arrays: thin wrappers that run the select stage's own code on rows in memory.

Each function builds in-memory rows (``rows.ArrayRows``) and calls the same rule the select stage runs shard by
shard, so both keep the same rows. Ties break by ``tie`` keys, or a seeded hash of ``uid`` (then the result
does not depend on row order), else a seeded hash of the row index.
"""
from __future__ import annotations

import numpy as np

from ..hashing import row_hash, uid_hash
from ..metrics.ranking import balanced_quotas
from ..params import parse_params
from ..rows import ArrayRows
from .rules import top_per_group
from .selectors import CCSParams, balanced, decide_ccs, rank_with_floors

SCORE = "score_x"


def array_rows(scores, seed: int, eligible=None, tie=None, uid=None, **groups) -> ArrayRows:
    """``scores`` (and group columns) as rows, with the tie key: ``tie``, else the seeded uid hash, else the
    seeded row hash."""
    scores = np.asarray(scores, dtype=np.float64)
    if tie is None:
        tie = uid_hash(uid, seed) if uid is not None else row_hash(len(scores), seed)
    cols = {SCORE: scores, "tie": np.asarray(tie, dtype=np.uint64),
            **{name: np.asarray(g, dtype=np.int64) for name, g in groups.items() if g is not None}}
    if eligible is not None:
        cols["eligible"] = np.asarray(eligible, dtype=bool)
    return ArrayRows(cols, seed)


def select_top(scores, n: int, mode: str, seed: int, eligible=None, tie=None, uid=None) -> np.ndarray:
    """Keep the ``n`` best rows by ``mode`` among ``eligible`` (NaN scores last). A bool mask."""
    rows = array_rows(scores, seed, eligible, tie, uid)
    return top_per_group(rows, SCORE, mode, None, [int(n)])(rows.block)


def keep_by_quota(scores, groups, quotas, mode: str, seed: int, eligible=None, tie=None, uid=None) -> np.ndarray:
    """Within each group g keep ``quotas[g]`` rows by ``mode``; rows with a negative group are never kept."""
    rows = array_rows(scores, seed, eligible, tie, uid, group=groups)
    return top_per_group(rows, SCORE, mode, "group", quotas)(rows.block)


def select_with_minimums(scores, n: int, mode: str, seed: int, groups=None, min_share: float = 0.0, eligible=None,
                         floors=(), tie=None, uid=None) -> np.ndarray:
    """Keep ``n`` rows by ``mode``, but first give every group of ``groups`` (and of each ``(groups, share)`` in
    ``floors``) its floor of ``min(ceil(share * n / G), size)`` rows, taken by the same rule within the group
    (the ``rank`` selector's ``min_per_cluster`` / ``min_per_label``)."""
    pairs = [(groups, min_share), *floors]
    rows = array_rows(scores, seed, eligible, tie, uid, **{f"g{i}": g for i, (g, _) in enumerate(pairs)})
    rule, _ = rank_with_floors(rows, int(n), SCORE, mode, [(f"g{i}", s) for i, (g, s) in enumerate(pairs)
                                                           if g is not None])
    return rule(rows.block)


def class_balanced_quotas(groups, n: int, eligible=None) -> np.ndarray:
    """``balanced_quotas`` over the sizes of ``groups`` (eligible rows, non-negative groups)."""
    groups = np.asarray(groups, dtype=np.int64)
    ok = groups >= 0 if eligible is None else (groups >= 0) & np.asarray(eligible, dtype=bool)
    return balanced_quotas(np.bincount(groups[ok], minlength=int(groups.max(initial=-1)) + 1), n)


def select_class_balanced(scores, n: int, mode: str, seed: int, groups, eligible=None, tie=None,
                          uid=None) -> np.ndarray:
    """Keep ``n`` rows with the same count per group where sizes allow, ``mode`` within each group (the
    ``balanced`` selector)."""
    rows = array_rows(scores, seed, eligible, tie, uid, group=groups)
    return balanced(rows, int(n), SCORE, mode, "group")[0](rows.block)


def ccs_select(scores, n: int, beta: float = 0.0, n_strata: int = 50, seed: int = 0, eligible=None, tie=None,
               uid=None) -> np.ndarray:
    """CCS keep mask with exactly ``n`` rows (the ``ccs`` selector): drop the hardest ``floor(beta * N)`` scored
    rows, split the rest's score range into ``n_strata`` equal-width strata, give the budget out from the
    smallest stratum up (``ccs_allocate``) and sample uniformly within each by the tie key. NaN or ineligible
    rows are never kept; a ConfigError when fewer than ``n`` rows remain."""
    params = parse_params(CCSParams, {"metric": SCORE[len("score_"):], "beta": beta, "strata": n_strata}, "ccs_select")
    rows = array_rows(scores, seed, eligible, tie, uid)
    return decide_ccs(rows, int(n), params, None)[0](rows.block)
