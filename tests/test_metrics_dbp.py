"""DBP: d_intra/d_inter/complexity by hand, quotas against brute-force QP solutions, the selector."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.optimize import minimize
from scipy.special import softmax

import datapruning.metrics.dbp as dbp_mod
from datapruning.score import METRICS
from datapruning.select import SELECTORS, select_dbp
from datapruning.score.base import ScoreInputs
from datapruning.metrics.dbp import (complexity, d_inter, d_intra, dbp_quotas, dbp_shares, project_capped_simplex)
from datapruning.select import SelectInputs


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_d_intra_by_hand_with_singletons_and_empty_clusters():
    cos_dist = np.array([0.1, 0.3, 0.5, 0.4, 0.4, 0.4])
    cluster = np.array([0, 0, 1, 2, 2, 2])
    # cluster 1 (one member) and cluster 3 (empty) get the mean over defined clusters: (0.2 + 0.4) / 2
    np.testing.assert_allclose(d_intra(cos_dist, cluster, 4), [0.2, 0.3, 0.4, 0.3])
    eligible = np.array([True, False, True, True, True, True])  # cluster 0 drops to one member
    np.testing.assert_allclose(d_intra(cos_dist, cluster, 4, eligible), [0.4, 0.4, 0.4, 0.4])
    # no cluster with two members: fall back to the overall mean, never NaN
    np.testing.assert_allclose(d_intra(np.array([0.2, 0.6]), np.array([0, 1]), 3), [0.4, 0.4, 0.4])
    with pytest.raises(ValueError):
        d_intra(cos_dist, cluster, 2)


def test_d_inter_by_hand():
    c = _unit(np.array([[1, 0], [0, 1], [1, 1]], np.float64))
    r = 1 - np.sqrt(0.5)
    np.testing.assert_allclose(d_inter(c, l=1), [r, r, r], atol=1e-6)
    np.testing.assert_allclose(d_inter(c, l=20), [(1 + r) / 2, (1 + r) / 2, r], atol=1e-6)  # l capped at k-1
    assert d_inter(c[:1], l=20).tolist() == [1.0]
    dup = _unit(np.array([[1, 0], [1, 0], [0, 1]], np.float64))  # self is excluded by index, not value
    np.testing.assert_allclose(d_inter(dup, l=1), [0, 0, 1], atol=1e-6)
    with pytest.raises(ValueError):
        d_inter(c, l=0)


def test_d_inter_blocked_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    c = _unit(rng.normal(size=(37, 5)))
    sims = c.astype(np.float64) @ c.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    want = 1 - np.sort(sims, axis=1)[:, -6:].mean(axis=1)
    monkeypatch.setattr(dbp_mod, "BLOCK_ELEMS", 100)  # 2 rows per block
    np.testing.assert_allclose(d_inter(c, l=6), want, atol=1e-6)


def test_shares_are_a_stable_softmax():
    C = np.array([0.1, 0.5, 0.3])
    np.testing.assert_allclose(dbp_shares(C, 0.1), softmax(C / 0.1))
    big = dbp_shares(np.array([1e4, 1e4 - 0.1, 0.0]), 0.01)
    assert np.isfinite(big).all() and big.sum() == pytest.approx(1.0) and big[2] == 0.0
    with pytest.raises(ValueError):
        dbp_shares(C, 0.0)
    np.testing.assert_allclose(complexity([0.5, 0.2], [0.4, 1.0]), [0.2, 0.2])


def _qp_scipy(a, lo, hi, total):
    res = minimize(lambda n: ((n - a) ** 2).sum(), np.clip(a, lo, hi), jac=lambda n: 2 * (n - a),
                   bounds=list(zip(lo, hi)), constraints=[{"type": "eq", "fun": lambda n: n.sum() - total}],
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    return res.x


@pytest.mark.parametrize("seed", range(15))
def test_projection_matches_a_generic_qp_solver(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    hi = rng.integers(0, 20, k).astype(float)
    lo = np.minimum(rng.integers(0, 4, k), hi).astype(float)
    total = float(rng.integers(lo.sum(), hi.sum() + 1))
    a = total * rng.dirichlet(np.ones(k) * 0.5)
    got = project_capped_simplex(a, lo, hi, total)
    assert got.sum() == pytest.approx(total) and (got >= lo - 1e-12).all() and (got <= hi + 1e-12).all()
    np.testing.assert_allclose(got, _qp_scipy(a, lo, hi, total), atol=1e-4)


@pytest.mark.parametrize("seed", range(25))
def test_integer_quotas_attain_the_brute_force_optimum(seed):
    rng = np.random.default_rng(100 + seed)
    sizes = rng.integers(0, 7, 3)
    N = int(rng.integers(0, sizes.sum() + 1))
    mpc = int(rng.integers(0, 3))
    lo = np.minimum(mpc, sizes)
    shares = rng.dirichlet(np.ones(3))
    if lo.sum() > N:
        with pytest.raises(ValueError):
            dbp_quotas(N, shares, sizes, mpc)
        return
    q = dbp_quotas(N, shares, sizes, mpc)
    best = min(((np.array(v) - N * shares) ** 2).sum() for v in itertools.product(*[range(s + 1) for s in sizes])
               if sum(v) == N and all(v[j] >= lo[j] for j in range(3)))
    assert ((q - N * shares) ** 2).sum() == pytest.approx(best, abs=1e-9)


def test_quotas_sum_exactly_where_rint_drifts():
    q = dbp_quotas(10, np.ones(3) / 3, np.array([10, 10, 10]))
    assert np.rint(10 * np.ones(3) / 3).sum() == 9 and q.sum() == 10 and q.tolist() == [4, 3, 3]
    with pytest.raises(ValueError):
        dbp_quotas(31, np.ones(3) / 3, np.array([10, 10, 10]))
    with pytest.raises(ValueError):
        dbp_quotas(5, np.ones(3) / 3, np.array([10, 10, 10]), min_per_cluster=2)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=30), st.floats(0.0, 1.0), st.integers(0, 5),
       st.floats(0.01, 2.0), st.integers(0, 2**31 - 1))
def test_quota_properties(sizes, frac, mpc, tau, seed):
    sizes = np.array(sizes)
    lo = np.minimum(mpc, sizes)
    N = max(int(lo.sum()), int(round(frac * sizes.sum())))
    shares = dbp_shares(np.random.default_rng(seed).random(len(sizes)), tau)
    q = dbp_quotas(N, shares, sizes, mpc)
    assert q.dtype == np.int64 and q.sum() == N and (q >= lo).all() and (q <= sizes).all()
    np.testing.assert_array_equal(q, dbp_quotas(N, shares, sizes, mpc))


def _select_data(seed=0, n=300, k=5):
    rng = np.random.default_rng(seed)
    cents = _unit(rng.normal(size=(k, 8)))
    cluster = rng.integers(0, k, n)
    cos_dist = rng.uniform(0.0, 0.6, n)
    cos_dist[cluster == 0] *= 0.2  # a tight, simple cluster: low complexity
    return SelectInputs(uid=np.arange(n).astype(str), cluster=cluster, cos_dist=cos_dist.astype(np.float32),
                        centroids=cents, scores={"other": rng.random(n)}, seed=seed)


def test_select_dbp_keeps_quota_hardest_per_cluster():
    inp = _select_data()
    keep, info = SELECTORS["dbp"](inp, 90, mode="hard", tau=0.1, l=2)
    assert keep.sum() == 90 == info["n_kept"]
    counts = np.bincount(inp.cluster[keep], minlength=5)
    assert counts.tolist() == info["quotas"]
    C = complexity(d_intra(inp.cos_dist, inp.cluster, 5), d_inter(inp.centroids, 2))
    np.testing.assert_allclose(info["complexity"], C)
    np.testing.assert_allclose(info["shares"], softmax(C / 0.1))
    assert info["quotas"][0] == min(info["quotas"])  # the simple cluster gets the smallest share
    for j in range(5):  # within a cluster the kept rows are the farthest from the centroid
        rows = np.flatnonzero(inp.cluster == j)
        if 0 < counts[j] < len(rows):
            assert inp.cos_dist[rows][keep[rows]].min() >= inp.cos_dist[rows][~keep[rows]].max()


def test_select_dbp_uses_only_eligible_rows_and_orders_by_cos_dist():
    inp = _select_data(1)
    eligible = np.random.default_rng(2).random(300) < 0.7
    inp = SelectInputs(**{**inp.__dict__, "eligible": eligible})
    keep, info = select_dbp(inp, 100, mode="easy")
    assert keep.sum() == 100 and not (keep & ~eligible).any() and info["order"] == "cos_dist"
    np.testing.assert_allclose(info["d_intra"], d_intra(inp.cos_dist, inp.cluster, 5, eligible))
    for j in range(5):  # easy: within each cluster the kept rows are the closest to the centroid
        rows = np.flatnonzero((inp.cluster == j) & eligible)
        s = inp.cos_dist[rows]
        if 0 < keep[rows].sum() < len(rows):
            assert s[keep[rows]].max() <= s[~keep[rows]].min()
    keep_all, info_all = select_dbp(inp, 10_000)  # more than eligible: capped
    assert (keep_all == eligible).all() and info_all["n_requested"] == 10_000
    with pytest.raises(ValueError, match="min_per_cluster"):
        select_dbp(inp, 10, min_per_cluster=5)  # a share of the budget, in [0, 1]
    with pytest.raises(ValueError, match="select.metric"):  # DBP orders by cos_dist: a metric means nothing
        select_dbp(inp, 10, metric="other")


def test_select_dbp_min_per_cluster_is_a_share_of_the_budget():
    """A share s gives every cluster at least floor(s * N / k) rows (it used to be int(s), so 0 for s < 1)."""
    inp = _select_data(4)
    sizes = np.bincount(inp.cluster, minlength=5)
    keep0, info0 = select_dbp(inp, 100, tau=0.01)
    keep5, info5 = select_dbp(inp, 100, tau=0.01, min_per_cluster=0.5)
    assert info5["floor_per_cluster"] == 10 and info0["floor_per_cluster"] == 0
    assert min(info5["quotas"]) >= min(10, sizes.min()) and keep5.sum() == 100
    assert min(info0["quotas"]) < min(info5["quotas"])


def test_select_dbp_random_mode_removes_rows_and_is_seeded():
    inp = _select_data(3)
    a, _ = select_dbp(inp, 50, mode="random")
    b, _ = select_dbp(inp, 50, mode="random")
    assert a.sum() == 50 and (a == b).all()


def test_degenerate_single_cluster_and_singletons():
    inp = SelectInputs(uid=np.arange(4).astype(str), cluster=np.array([0, 1, 2, 2]),
                       cos_dist=np.array([0.0, 0.0, 0.1, 0.3], np.float32),
                       centroids=_unit(np.eye(3)), scores={})
    keep, info = select_dbp(inp, 2)
    assert keep.sum() == 2 and np.isfinite(info["complexity"]).all()
    one = SelectInputs(uid=np.arange(3).astype(str), cluster=np.zeros(3, np.int64),
                       cos_dist=np.array([0.1, 0.2, 0.3], np.float32), centroids=_unit(np.ones((1, 2))), scores={})
    keep, info = select_dbp(one, 2)
    assert keep.tolist() == [False, True, True] and info["shares"] == [1.0]


def test_score_dbp_adapter():
    s = _select_data()
    inp = ScoreInputs(uid=s.uid, embeddings=np.zeros((300, 8), np.float32), cluster=s.cluster,
                      cos_dist=s.cos_dist, centroids=s.centroids)
    out = METRICS["dbp"](inp, tau=0.1, l=3)
    C = complexity(d_intra(s.cos_dist, s.cluster, 5), d_inter(s.centroids, 3))
    np.testing.assert_allclose(out.scores, C[s.cluster])
    np.testing.assert_allclose(out.info["complexity"], C)
