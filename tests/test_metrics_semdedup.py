"""SemDeDup: blocked duplicate scores against an O(n^2) reference, eps masks and eps tuning."""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from datapruning.score import METRICS
from datapruning.score.base import ScoreInputs
from datapruning.metrics.semdedup import (eps_for_keep_fraction, removal_mask, removed_per_eps,
                                          semdedup_filter, semdedup_masks, semdedup_scores)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n=120, d=6, k=4, seed=0, dup_frac=0.3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    dup = rng.random(n) < dup_frac  # near-duplicates of the previous row
    for i in np.flatnonzero(dup)[1:]:
        x[i] = x[i - 1] + 1e-3 * rng.normal(size=d)
    x = _unit(x)
    cluster = rng.integers(0, k, n)
    cos_dist = rng.random(n).astype(np.float32)  # distinct values: the order is tie-free
    return x, cluster, cos_dist


def _reference(x, cluster, cos_dist, mode):
    """O(n^2) per cluster: order by keep preference, score = max sim to an earlier member."""
    out = np.full(len(x), -1.0)
    for c in np.unique(cluster):
        rows = np.flatnonzero(cluster == c)
        rows = rows[np.argsort(-cos_dist[rows] if mode == "hard" else cos_dist[rows])]
        sims = x[rows].astype(np.float64) @ x[rows].astype(np.float64).T
        for j in range(1, len(rows)):
            out[rows[j]] = sims[j, :j].max()
    return np.clip(out, -1, 1)


@pytest.mark.parametrize("mode", ["hard", "easy"])
@pytest.mark.parametrize("block_rows", [1, 2, 7, 16, 1000])
def test_matches_quadratic_reference_for_any_block_size(mode, block_rows):
    x, cluster, cos_dist = _data()
    got = semdedup_scores(x, cluster, cos_dist, mode, seed=0, block_rows=block_rows)
    np.testing.assert_allclose(got, _reference(x, cluster, cos_dist, mode), atol=1e-6)


def test_hand_case_keeps_farthest_in_hard_and_closest_in_easy():
    e1, e2 = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    x = np.stack([e1, e1, e2])
    cluster = np.zeros(3, np.int64)
    cos_dist = np.array([0.3, 0.1, 0.2], np.float32)
    assert semdedup_scores(x, cluster, cos_dist, "hard").tolist() == [-1.0, 1.0, 0.0]
    assert semdedup_scores(x, cluster, cos_dist, "easy").tolist() == [1.0, -1.0, 0.0]
    hard = semdedup_scores(x, cluster, cos_dist, "hard")
    assert removal_mask(hard, 0.01).tolist() == [False, True, False]
    assert removal_mask(hard, 0.0).tolist() == [False, False, False]  # removal needs sim > 1 - eps


def test_exact_duplicate_groups_keep_one_each_in_every_mode():
    rng = np.random.default_rng(3)
    base = _unit(rng.normal(size=(10, 8)))
    group = rng.integers(0, 10, 200)
    x = base[group]
    cluster = group % 3
    cos_dist = rng.random(200).astype(np.float32)
    for mode in ("hard", "easy", "random"):
        kept = ~removal_mask(semdedup_scores(x, cluster, cos_dist, mode, seed=1, block_rows=13), 1e-4)
        assert sorted(group[kept].tolist()) == sorted(np.unique(group).tolist())
        if mode == "hard":  # the survivor of each group is the farthest from its centroid
            for g in np.unique(group):
                rows = np.flatnonzero(group == g)
                assert kept[rows[np.argmax(cos_dist[rows])]]


def test_random_mode_is_seed_stable_and_seed_dependent():
    x, cluster, cos_dist = _data(dup_frac=0.0)
    a = semdedup_scores(x, cluster, cos_dist, "random", seed=5, block_rows=8)
    b = semdedup_scores(x, cluster, cos_dist, "random", seed=5, block_rows=50)
    c = semdedup_scores(x, cluster, cos_dist, "random", seed=6)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a, c)


def test_degenerate_inputs():
    x = _unit(np.ones((4, 3)))
    # singletons and unassigned rows are never duplicates; identical rows are
    scores = semdedup_scores(x, np.array([0, 1, -1, 1]), np.zeros(4, np.float32), "hard")
    assert scores[0] == -1.0 and scores[2] == -1.0
    assert sorted(scores[[1, 3]].tolist()) == pytest.approx([-1.0, 1.0], abs=1e-6)
    assert semdedup_scores(np.zeros((0, 3), np.float32), np.zeros(0), np.zeros(0), "hard").shape == (0,)
    with pytest.raises(ValueError):
        semdedup_scores(x, np.zeros(3), np.zeros(4), "hard")
    with pytest.raises(ValueError):
        semdedup_scores(x, np.zeros(4), np.zeros(4), "hardest")
    with pytest.raises(ValueError):
        semdedup_scores(x, np.zeros(4), np.zeros(4), "hard", block_rows=0)


def test_memory_is_bounded_by_the_block():
    rng = np.random.default_rng(0)
    n = 3000  # one cluster: a full similarity matrix would take 36 MB
    x = _unit(rng.normal(size=(n, 8)))
    tracemalloc.start()
    semdedup_scores(x, np.zeros(n, np.int64), rng.random(n).astype(np.float32), "hard", block_rows=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4_000_000


def test_masks_counts_and_removed_per_eps_agree():
    x, cluster, cos_dist = _data()
    scores = semdedup_scores(x, cluster, cos_dist, "hard")
    eps = [0.0, 1e-4, 0.01, 0.5, 2.5]
    masks, counts = semdedup_masks(scores, eps)
    assert {str(e): c for e, c in counts.items()} == {str(e): int(masks[e].sum()) for e in eps} == removed_per_eps(scores, eps)
    assert counts[2.5] == len(scores) and counts[0.0] == 0
    assert [counts[e] for e in eps] == sorted(counts[e] for e in eps)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([-1.0, -0.2, 0.5, 0.9, 0.99, 0.999, 1.0]), min_size=1, max_size=40),
       st.floats(0.0, 1.0))
def test_eps_for_keep_fraction_is_the_largest_eps_reaching_the_target(values, target):
    scores = np.array(values)
    want = max(1, int(np.ceil(target * len(scores) - 1e-9)))
    eps = eps_for_keep_fraction(scores, target)
    kept = int((~removal_mask(scores, eps)).sum())
    # brute force over every eps at which the kept count changes
    candidates = [(int((~removal_mask(scores, max(0.0, 1 - s))).sum()), max(0.0, 1 - s)) for s in scores]
    best = max((e for k, e in candidates if k >= want), default=0.0)
    assert kept >= want
    assert kept == int((~removal_mask(scores, best)).sum())


def test_eps_for_keep_fraction_hits_sixty_percent_on_continuous_scores():
    scores = np.random.default_rng(1).uniform(0.9, 1.0, 1000)
    eligible, info = semdedup_filter(scores, keep_fraction=0.6)
    assert eligible.sum() == 600 and info["kept"] == 600
    again, info2 = semdedup_filter(scores, eps=info["eps"])
    assert (again == eligible).all() and info2["removed"] == 400
    with pytest.raises(ValueError):
        semdedup_filter(scores)
    with pytest.raises(ValueError):
        semdedup_filter(scores, eps=0.1, keep_fraction=0.5)
    with pytest.raises(ValueError):
        eps_for_keep_fraction(scores, 1.5)


def test_adapter_is_registered_and_reports_counts():
    x, cluster, cos_dist = _data()
    inp = ScoreInputs(uid=np.arange(len(x)).astype(str), embeddings=x, cluster=cluster, cos_dist=cos_dist,
                      centroids=_unit(np.ones((4, x.shape[1]))), seed=0)
    assert METRICS["semdedup"].unit == "cluster"
    out = METRICS["semdedup"](inp, mode="hard", block_rows=16, eps=[0.001, 0.1])
    np.testing.assert_allclose(out.scores, _reference(x, cluster, cos_dist, "hard"), atol=1e-6)
    assert out.info["removed"] == {"0.001": int((out.scores > 0.999).sum()), "0.1": int((out.scores > 0.9).sum())}
    assert set(out.info["eps_for_keep_fraction"]) == {"0.9", "0.8", "0.7", "0.6", "0.5"}


def test_scale_sanity_small():
    rng = np.random.default_rng(0)
    n, k = 20_000, 40
    x = _unit(rng.normal(size=(n, 32)))
    cluster = rng.integers(0, k, n)
    scores = semdedup_scores(x, cluster, rng.random(n).astype(np.float32), "hard", block_rows=256)
    assert scores.shape == (n,) and np.isfinite(scores).all() and (scores[scores > -1] < 1).all()
