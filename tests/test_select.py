"""Selection: exact keep counts, modes, seeded tie-breaks, group floors and balanced quotas."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from datapruning.select import (SelectInputs, ccs_select, class_balanced_quotas, keep_by_quota, keep_count,
                                rank_order, select_ccs, select_class_balanced, select_rank, select_top,
                                select_with_minimums)


def test_keep_count():
    assert keep_count(10, 0.25, None) == 2 and keep_count(10, None, 30) == 10 and keep_count(10, 1.0, None) == 10
    with pytest.raises(ValueError, match="exactly one"):
        keep_count(10, 0.5, 3)
    with pytest.raises(ValueError, match="keep_fraction"):
        keep_count(10, 1.5, None)


def test_rank_order_modes_and_nan_last():
    s = np.array([0.3, np.nan, 0.9, 0.1])
    assert rank_order(s, "hard", 0).tolist() == [2, 0, 3, 1]
    assert rank_order(s, "easy", 0).tolist() == [3, 0, 2, 1]
    assert sorted(rank_order(s, "random", 0).tolist()) == [0, 1, 2, 3] and rank_order(s, "random", 0)[-1] == 1
    with pytest.raises(ValueError, match="select.mode"):
        rank_order(s, "hardest", 0)


def test_ties_break_by_seed_but_stably():
    s = np.zeros(50)
    a, b, c = (select_top(s, 10, "hard", seed) for seed in (0, 0, 1))
    assert a.sum() == 10 and (a == b).all() and (a != c).any()


def test_select_top_respects_eligible():
    s = np.arange(10.0)
    eligible = np.arange(10) % 2 == 0
    assert np.flatnonzero(select_top(s, 3, "hard", 0, eligible)).tolist() == [4, 6, 8]


def test_minimum_share_per_group():
    s = np.array([9, 8, 7, 6, 5, 1, 0.5, 0.2], dtype=float)
    groups = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    plain = select_with_minimums(s, 4, "hard", 0)
    assert np.flatnonzero(plain).tolist() == [0, 1, 2, 3]
    floored = select_with_minimums(s, 4, "hard", 0, groups, min_share=1.0)  # 2 per group
    assert np.flatnonzero(floored).tolist() == [0, 1, 5, 6]


def test_two_floors_together():
    s = np.arange(12, dtype=float)[::-1]  # row 0 is hardest
    cluster = np.array([0] * 6 + [1] * 6)
    labels = np.array([0, 1] * 6)
    inp = SelectInputs(uid=np.arange(12), cluster=cluster, cos_dist=s, centroids=np.zeros((2, 2)), scores={"m": s},
                       labels=labels)
    keep, _ = select_rank(inp, 4, metric="m", mode="hard", min_per_cluster=0.5, min_per_label=0.5)
    assert keep.sum() == 4
    assert np.flatnonzero(keep).tolist() == [0, 1, 2, 6]  # floors: rows 0 and 6 (clusters), 0 and 1 (labels)


def test_keep_by_quota():
    s = np.array([1, 5, 3, 2, 8, 4], dtype=float)
    groups = np.array([0, 0, 0, 1, 1, -1])
    keep = keep_by_quota(s, groups, np.array([2, 1]), "easy", 0)
    assert np.flatnonzero(keep).tolist() == [0, 2, 3]


def test_class_balanced_quotas_water_fill():
    groups = np.array([0] * 2 + [1] * 10 + [2] * 10)
    assert class_balanced_quotas(groups, 12).tolist() == [2, 5, 5]
    assert class_balanced_quotas(groups, 100).tolist() == [2, 10, 10]
    assert class_balanced_quotas(groups, 4).tolist() == [2, 1, 1]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(1, 6), st.floats(0, 1), st.integers(0, 3), st.sampled_from(["hard", "easy", "random"]))
def test_properties_exact_count_floors_and_seed_stability(n_rows, n_groups, share, seed, mode):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=n_rows)
    groups = rng.integers(n_groups, size=n_rows)
    n = int(rng.integers(0, n_rows + 1))
    keep = select_with_minimums(scores, n, mode, seed, groups, share)
    assert keep.sum() == n
    assert (keep == select_with_minimums(scores, n, mode, seed, groups, share)).all()
    floor = int(np.ceil(share * n / len(np.unique(groups)))) if share > 0 else 0
    need = sum(min(floor, int((groups == g).sum())) for g in np.unique(groups))
    if need <= n:  # every floor met whenever the floors fit the budget
        for g in np.unique(groups):
            assert keep[groups == g].sum() >= min(floor, (groups == g).sum())
    quotas = class_balanced_quotas(groups, n)
    assert quotas.sum() == n and (quotas <= np.bincount(groups, minlength=len(quotas))).all()


def test_nan_scores_go_last_in_every_mode():
    s = np.where(np.arange(300) % 2 == 0, np.nan, np.arange(300.0))
    for mode in ("hard", "easy", "random"):
        keep = select_top(s, 140, mode, 0)
        assert keep.sum() == 140 and not np.isnan(s[keep]).any(), mode


CALLS = {  # every array selection function, called with uids (the seeded uid hash breaks ties)
    "select_top": lambda s, g, n, uid, mode: select_top(s, n, mode, 3, uid=uid),
    "keep_by_quota": lambda s, g, n, uid, mode: keep_by_quota(s, g, np.full(g.max() + 1, max(1, n // 4)), mode, 3,
                                                              uid=uid),
    "select_with_minimums": lambda s, g, n, uid, mode: select_with_minimums(s, n, mode, 3, g, 0.4,
                                                                            floors=((g % 2, 0.3),), uid=uid),
    "select_class_balanced": lambda s, g, n, uid, mode: select_class_balanced(s, n, mode, 3, g, uid=uid),
    "ccs_select": lambda s, g, n, uid, mode: ccs_select(s, n, beta=0.1, n_strata=7, seed=3, uid=uid),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(1, 6), st.integers(0, 10**6), st.sampled_from(["hard", "easy", "random"]))
def test_every_array_selector_ignores_row_order(name, n_rows, n_groups, seed, mode):
    """The same rows in another order keep the same uids: ties break by the seeded uid hash, never by row."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=n_rows), 1)  # many exact ties
    scores[rng.random(n_rows) < 0.1] = np.nan
    groups = rng.integers(n_groups, size=n_rows)
    uid = np.array([f"u{i}" for i in range(n_rows)], dtype=object)
    n = int(rng.integers(0, int(0.8 * np.count_nonzero(~np.isnan(scores))) + 1))
    keep = CALLS[name](scores, groups, n, uid, mode)
    perm = rng.permutation(n_rows)
    again = CALLS[name](scores[perm], groups[perm], n, uid[perm], mode)
    assert set(uid[keep]) == set(uid[perm][again])


def test_ccs_equals_the_registered_selector():
    """``ccs_select`` and ``select.method: ccs`` are one code path (the README's function is the stage's rule)."""
    rng = np.random.default_rng(0)
    s = rng.random(2000)
    uid = np.array([f"id{i}" for i in range(2000)], dtype=object)
    inp = SelectInputs(uid=uid, cluster=np.zeros(2000, np.int64), cos_dist=s, centroids=np.zeros((1, 2)),
                       scores={"el2n": s})
    keep, info = select_ccs(inp, 600, metric="el2n", beta=0.2, strata=50)
    np.testing.assert_array_equal(keep, ccs_select(s, 600, beta=0.2, n_strata=50, seed=0, uid=uid))
    assert info["n_kept"] == 600
