"""SemDeDup with bit-identical rows collapsed gives the bits of the uncollapsed definition (docs/methods.md)."""
from __future__ import annotations

import numpy as np
import pytest

from test_determinism import brute_semdedup
from datapruning.metrics.exact import unit_rows
from datapruning.metrics.pairs import first_copies, plan_queries, prefix_max, row_hashes
from datapruning.metrics.ranking import rank_order
from datapruning.metrics.semdedup import semdedup_scores


def copies_data(seed: int, n: int = 300, d: int = 12):
    """3 clusters; half the rows are exact copies of 6 sources, some rows the same vector with a last-bit
    larger norm (so a later non-copy can beat a copy's own similarity), plus -0.0/+0.0 twins."""
    rng = np.random.default_rng(seed)
    x = unit_rows(rng.normal(size=(n, d)).astype(np.float32))
    sources = unit_rows(rng.normal(size=(6, d)).astype(np.float32))
    copy = rng.random(n) < 0.5
    x[copy] = sources[rng.integers(6, size=int(copy.sum()))]
    bumped = np.flatnonzero(~copy)[:20]
    x[bumped] = np.nextafter(sources[rng.integers(6, size=len(bumped))], np.float32(2))  # every coordinate + 1 ulp
    twins = np.flatnonzero(~copy)[20:24]
    x[twins] = np.abs(x[twins[0]])
    x[twins[:2], 0] = 0.0
    x[twins[2:], 0] = -0.0  # equal values, other bits: not collapsed, still the same scores
    cluster = rng.integers(0, 3, n)
    cluster[copy] = rng.integers(0, 2, int(copy.sum()))  # copies of one source land in both clusters 0 and 1
    cos_dist = np.where(copy, 0.25, rng.random(n)).astype(np.float32)  # copies tie on the distance
    return x, cluster, cos_dist


@pytest.mark.parametrize("mode", ["hard", "easy", "random"])
@pytest.mark.parametrize("seed", [0, 1])
def test_collapsed_scores_are_the_exact_definition(mode, seed):
    x, cluster, cos_dist = copies_data(seed)
    tie = np.random.default_rng(seed + 7).integers(0, 1 << 63, size=len(x), dtype=np.uint64)
    order = rank_order(cos_dist.astype(np.float64), mode, 3, tie)
    ref = brute_semdedup(x, cluster, order)
    for block in (1, 5, 64, 2048):
        got = semdedup_scores(x, cluster, cos_dist, mode, seed=3, block_rows=block, tie=tie)
        np.testing.assert_array_equal(got, ref)


def test_a_later_near_copy_with_a_larger_norm_counts_for_the_copies_after_it():
    e = np.array([0.3, 0.4, 0.0], np.float32)  # norm 0.5: the scores stay below the clip at 1
    bigger = np.nextafter(e, np.float32(2))  # <bigger, e> > <e, e>
    x = np.stack([e, bigger, e, e]).astype(np.float32)
    cos_dist = np.array([0.4, 0.3, 0.2, 0.1], np.float32)  # hard: rows in this order
    got = semdedup_scores(x, np.zeros(4, np.int64), cos_dist, "hard", block_rows=1)
    np.testing.assert_array_equal(got, brute_semdedup(x, np.zeros(4, np.int64), np.arange(4)))
    assert got[2] == got[3] == np.float32(np.dot(bigger.astype(np.float64), e.astype(np.float64)))
    assert got[2] > np.float32(np.dot(e.astype(np.float64), e.astype(np.float64)))


def test_hash_collisions_are_caught_by_comparing_bits():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(5, 4)).astype(np.float32)
    pick = rng.integers(5, size=40)
    x = src[pick]
    truth = np.array([int(np.flatnonzero(pick == pick[i])[0]) for i in range(len(x))])
    np.testing.assert_array_equal(first_copies(row_hashes(x), lambda at: x[at]), truth)
    forged = np.zeros(len(x), np.uint64)  # every row collides: the bits decide
    got = first_copies(forged, lambda at: x[at])
    assert all(np.array_equal(x[got[i]], x[i]) for i in range(len(x)))
    assert (got[pick == pick[0]] == 0).all() and (got[np.flatnonzero(pick != pick[0])] == np.flatnonzero(pick != pick[0])).all()


def test_copies_cost_one_row_of_similarities_each():
    rng = np.random.default_rng(1)
    x = unit_rows(rng.normal(size=(10, 8)).astype(np.float32))
    keep_order = x[rng.integers(10, size=5000)]  # 5,000 rows, 10 distinct vectors
    q = plan_queries(first_copies(row_hashes(keep_order), lambda at: keep_order[at]))
    assert len(q.distinct) == 10 and len(q.rep) <= 10 * 11  # queries: (vector, distinct rows before it)
    reads = []

    def read(lo, hi):
        reads.append(hi - lo)
        return keep_order[q.distinct[lo:hi]]

    values = prefix_max(read, q.rep, q.length, 0, len(q.distinct), 4)
    assert sum(reads) < 100  # the 10 distinct rows, a few blocks at a time: no pass over the 5,000
    direct = semdedup_scores(keep_order, np.zeros(5000, np.int64), np.linspace(1, 0, 5000, dtype=np.float32))
    np.testing.assert_array_equal(np.clip(values[q.query].astype(np.float64), -1, 1), direct)


def test_prefix_max_over_row_block_ranges_matches_one_pass():
    x, cluster, cos_dist = copies_data(4, n=400)
    rows = np.flatnonzero(cluster == 0)
    q = plan_queries(first_copies(row_hashes(x[rows]), lambda at: x[rows[at]]))
    read = lambda lo, hi: x[rows[q.distinct[lo:hi]]]  # noqa: E731
    whole = prefix_max(read, q.rep, q.length, 0, len(q.distinct), 8)
    parts = [prefix_max(read, q.rep, q.length, lo, min(lo + 24, len(q.distinct)), 8)
             for lo in range(0, len(q.distinct), 24)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(AssertionError):
        prefix_max(read, q.rep, q.length, 3, len(q.distinct), 8)
