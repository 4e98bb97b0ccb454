"""CCS: budget allocation, hard cutoff, stratified sampling, default beta and the selector."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from datapruning.metrics.ccs import ccs_allocate, ccs_default_beta
from datapruning.select import ccs_select
from datapruning.select import SELECTORS, select_ccs
from datapruning.select import SelectInputs


def test_allocate_by_hand():
    assert ccs_allocate([1, 5, 10], 9).tolist() == [1, 4, 4]
    assert ccs_allocate([10, 0, 3], 13).tolist() == [10, 0, 3]
    assert ccs_allocate([4, 4, 4], 4).tolist() == [1, 1, 2]
    with pytest.raises(ValueError):
        ccs_allocate([1, 2], 4)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=60), st.floats(0, 1))
def test_allocate_properties(sizes, frac):
    sizes = np.array(sizes)
    n = int(frac * sizes.sum())
    alloc = ccs_allocate(sizes, n)
    assert alloc.sum() == n and (alloc >= 0).all() and (alloc <= sizes).all()
    full = alloc == sizes  # water-filling: a stratum not taken whole gets at least any other's share
    if (~full).any():
        assert alloc[~full].min() >= alloc.max() - 1


def test_drops_hardest_and_covers_every_stratum():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.uniform(0, 1, 900), rng.uniform(9, 10, 100)]
    keep = ccs_select(scores, 100, beta=0.05, n_strata=10, seed=0)
    assert keep.sum() == 100
    hardest = np.argsort(-scores)[:50]
    assert not keep[hardest].any()
    kept = scores[keep]
    lo, hi = scores[~np.isin(np.arange(1000), hardest)].min(), np.sort(scores)[-51]
    counts = np.histogram(kept, bins=np.linspace(lo, hi, 11))[0]
    pool = np.histogram(scores[~np.isin(np.arange(1000), hardest)], bins=np.linspace(lo, hi, 11))[0]
    np.testing.assert_array_equal(counts, ccs_allocate(pool, 100))
    assert (kept > 5).sum() == counts[-1] > 0  # the sparse hard tail is covered, not swamped


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 300), st.floats(0, 0.5), st.integers(1, 60))
def test_keep_count_is_exact_and_seed_stable(seed, n_rows, beta, strata):
    rng = np.random.default_rng(seed)
    scores = rng.gamma(2.0, size=n_rows)
    scores[rng.random(n_rows) < 0.1] = np.nan
    avail = int((~np.isnan(scores)).sum())
    room = avail - int(beta * avail)
    n = int(rng.integers(0, room + 1))
    keep = ccs_select(scores, n, beta, strata, seed)
    assert keep.sum() == n and not keep[np.isnan(scores)].any()
    np.testing.assert_array_equal(keep, ccs_select(scores, n, beta, strata, seed))
    with pytest.raises(ValueError):
        ccs_select(scores, room + 1, beta, strata, seed)


def test_identical_scores_and_bad_params():
    keep = ccs_select(np.ones(10), 4, beta=0.2, seed=3)
    assert keep.sum() == 4
    with pytest.raises(ValueError):
        ccs_select(np.ones(10), 4, beta=1.0)
    with pytest.raises(ValueError):
        ccs_select(np.ones(10), 4, n_strata=0)
    a = ccs_select(np.arange(100.0), 10, seed=1)
    assert a.sum() == 10 and (a != ccs_select(np.arange(100.0), 10, seed=2)).any()


def test_default_beta():
    assert ccs_default_beta(0.9) == pytest.approx(0.3)
    assert ccs_default_beta(0.8) == pytest.approx(0.2)
    assert ccs_default_beta(0.85) == pytest.approx(0.25)
    assert ccs_default_beta(0.5) == 0.0 and ccs_default_beta(0.3) == 0.0
    assert ccs_default_beta(0.99) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        ccs_default_beta(1.2)


def test_selector_uses_default_beta_and_eligible_rows():
    rng = np.random.default_rng(4)
    n_rows = 1000
    scores = rng.random(n_rows)
    eligible = np.ones(n_rows, bool)
    eligible[:200] = False
    inp = SelectInputs(uid=np.arange(n_rows).astype(str), cluster=np.zeros(n_rows, np.int64),
                       cos_dist=np.zeros(n_rows, np.float32), centroids=np.zeros((1, 2), np.float32),
                       scores={"el2n": scores}, eligible=eligible, seed=0)
    keep, info = SELECTORS["ccs"](inp, 80, metric="el2n")  # 90% pruning of the 800 eligible rows
    assert keep.sum() == 80 and not keep[:200].any()
    assert info["beta"] == pytest.approx(0.3) and info["dropped_hard"] == 240
    assert scores[keep].max() <= np.sort(scores[200:])[-241]
    keep2, info2 = select_ccs(inp, 80, beta=0.0, strata=5)
    assert info2["dropped_hard"] == 0 and keep2.sum() == 80
    with pytest.raises(ValueError):
        select_ccs(inp, 80, metric="forgetting")
