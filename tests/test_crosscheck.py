"""Cross-checks: each method reimplemented here with plain loops from docs/methods.md, against the package."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datapruning.consumers.kd import kd_loss
from datapruning.metrics import el2n, semdedup_scores
from datapruning.score import METRICS
from datapruning.score.base import ScoreInputs
from datapruning.select import SELECTORS, SelectInputs


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def data(seed=0, n=300, d=8, k=6, classes=5):
    rng = np.random.default_rng(seed)
    cents = unit(rng.normal(size=(k, d))).astype(np.float32)
    cluster = rng.integers(k, size=n)
    x = unit(cents[cluster] * 3 + rng.normal(size=(n, d))).astype(np.float32)
    cos = np.array([1 - float(np.dot(x[i], cents[cluster[i]])) for i in range(n)], np.float32)
    labels = rng.integers(classes, size=n)
    return ScoreInputs(uid=np.array([f"u{i}" for i in range(n)]), embeddings=x, cluster=cluster, cos_dist=cos,
                       centroids=cents, labels=labels, seed=seed)


def dot(a, b):
    return sum(float(p) * float(q) for p, q in zip(a, b))


def test_ssp_is_the_cosine_distance_to_the_own_centroid():
    inp = data()
    got = METRICS["ssp"](inp).scores
    for i in range(len(got)):
        assert got[i] == pytest.approx(1 - dot(inp.embeddings[i], inp.centroids[inp.cluster[i]]), abs=1e-6)


def test_semdedup_keeps_the_member_farthest_from_the_centroid():
    inp = data(1, n=120)
    x = inp.embeddings.copy()
    x[1::3] = x[0::3][: len(x[1::3])]  # exact duplicates in the same cluster
    cluster = inp.cluster.copy()
    cluster[1::3] = cluster[0::3][: len(cluster[1::3])]
    cos = np.array([1 - dot(x[i], inp.centroids[cluster[i]]) for i in range(len(x))])
    cos = cos + np.arange(len(x)) * 1e-9  # distinct, so the order is the same in both implementations
    got = semdedup_scores(x, cluster, cos, mode="hard")
    for i in range(len(x)):  # sim to any member of the cluster that comes earlier (farther from the centroid)
        earlier = [j for j in range(len(x)) if cluster[j] == cluster[i] and cos[j] > cos[i]]
        want = max((dot(x[i], x[j]) for j in earlier), default=-1.0)
        assert got[i] == pytest.approx(want, abs=1e-5)
    removed = got > 1 - 0.001
    for c in np.unique(cluster):  # every group of exact duplicates keeps exactly its farthest member
        rows = np.flatnonzero(cluster == c)
        for r in rows:
            group = [j for j in rows if dot(x[j], x[r]) > 1 - 1e-6]
            kept = [j for j in group if not removed[j]]
            assert kept == [max(group, key=lambda j: cos[j])]


def capped_simplex(a, lo, hi, total):
    """min ||n - a||^2, sum n = total, lo <= n <= hi: bisection on lambda in n = clip(a - lambda, lo, hi)."""
    left, right = float(np.min(a - hi)) - 1, float(np.max(a - lo)) + 1
    for _ in range(200):
        mid = (left + right) / 2
        if sum(min(max(a[j] - mid, lo[j]), hi[j]) for j in range(len(a))) > total:
            left = mid
        else:
            right = mid
    return np.array([min(max(a[j] - right, lo[j]), hi[j]) for j in range(len(a))])


def largest_remainder(x, total, hi):
    out = [math.floor(v) for v in x]
    rest = sorted(range(len(x)), key=lambda j: (-(x[j] - out[j]), j))
    for j in rest:
        if sum(out) >= total:
            break
        if out[j] < hi[j]:
            out[j] += 1
    return np.array(out)


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_dbp_quotas_and_within_cluster_order(share):
    inp = data(2, n=400, k=8)
    k, n_keep, tau, l = 8, 120, 0.1, 3
    sizes = np.array([int((inp.cluster == j).sum()) for j in range(k)])
    intra = [np.mean([inp.cos_dist[i] for i in range(len(inp.cluster)) if inp.cluster[i] == j]) for j in range(k)]
    inter = []
    for j in range(k):
        others = sorted(1 - dot(inp.centroids[j], inp.centroids[m]) for m in range(k) if m != j)
        inter.append(np.mean(others[:l]))
    C = np.array(intra) * np.array(inter)
    P = np.exp(C / tau) / np.exp(C / tau).sum()
    floor = math.floor(share * n_keep / k)
    lo = np.minimum(floor, sizes)
    want = largest_remainder(capped_simplex(n_keep * P, lo, sizes, n_keep), n_keep, sizes)
    sel = SelectInputs(uid=inp.uid, cluster=inp.cluster, cos_dist=inp.cos_dist, centroids=inp.centroids,
                       scores={}, seed=0)
    keep, info = SELECTORS["dbp"](sel, n_keep, tau=tau, l=l, min_per_cluster=share)
    np.testing.assert_array_equal(info["quotas"], want)
    for j in range(k):  # hard: the quota farthest from the centroid
        rows = sorted(np.flatnonzero(inp.cluster == j), key=lambda i: -inp.cos_dist[i])
        assert sorted(np.flatnonzero(keep & (inp.cluster == j))) == sorted(rows[: want[j]])


def test_ccs_drops_the_hardest_and_fills_strata_from_the_smallest_up():
    rng = np.random.default_rng(3)
    n, keep_n, beta, strata = 500, 100, 0.2, 10
    s = rng.gamma(2.0, size=n)
    sel = SelectInputs(uid=np.array([f"u{i}" for i in range(n)]), cluster=np.zeros(n, np.int64),
                       cos_dist=np.zeros(n, np.float32), centroids=np.zeros((1, 2), np.float32), scores={"el2n": s})
    keep, info = SELECTORS["ccs"](sel, keep_n, beta=beta, strata=strata)
    order = sorted(range(n), key=lambda i: -s[i])
    dropped = set(order[: int(beta * n)])
    pool = [i for i in range(n) if i not in dropped]
    lo, hi = min(s[i] for i in pool), max(s[i] for i in pool)
    stratum = {i: min(int((s[i] - lo) / ((hi - lo) / strata)), strata - 1) for i in pool}
    sizes = [sum(1 for i in pool if stratum[i] == b) for b in range(strata)]
    alloc, remaining = [0] * strata, keep_n
    for left, b in enumerate(sorted(range(strata), key=lambda b: (sizes[b], b))):
        alloc[b] = min(sizes[b], remaining // (strata - left))
        remaining -= alloc[b]
    assert keep.sum() == keep_n and not any(keep[i] for i in dropped)
    assert [sum(1 for i in pool if keep[i] and stratum[i] == b) for b in range(strata)] == alloc


def test_el2n_is_the_mean_l2_error_of_the_softmax():
    rng = np.random.default_rng(4)
    logits, y = rng.normal(size=(3, 20, 5)) * 2, rng.integers(5, size=20)
    got = el2n(logits, y)
    for i in range(20):
        errs = []
        for m in range(3):
            e = [math.exp(v) for v in logits[m, i]]
            p = [v / sum(e) for v in e]
            errs.append(math.sqrt(sum((p[c] - (c == y[i])) ** 2 for c in range(5))))
        assert got[i] == float(np.float32(sum(errs) / 3))  # stored at float32 precision (rounded once)


def test_dp4tl_label_and_feature_mapping_count_target_hits(tmp_path):
    inp = data(5, n=200, k=6, classes=6)
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(50, 6))
    np.save(tmp_path / "logits.npy", logits)
    freq = [0] * 6
    for row in logits:
        freq[max(range(6), key=lambda c: row[c])] += 1
    got = METRICS["dp4tl_lm"](inp, route="logits", logits=str(tmp_path / "logits.npy"))
    assert got.scores.tolist() == [float(freq[y]) for y in inp.labels]
    target = rng.normal(size=(40, 8)) * rng.uniform(0.5, 3, size=(40, 1))  # raw norms vary: cosine is the rule
    np.save(tmp_path / "target.npy", target)
    hits = [0] * 6
    for t in target:
        sims = [dot(t, c) / math.sqrt(dot(c, c)) for c in inp.centroids]
        hits[max(range(6), key=lambda j: sims[j])] += 1
    got = METRICS["dp4tl_fm"](inp, target=str(tmp_path / "target.npy"))
    assert got.scores.tolist() == [float(hits[c]) for c in inp.cluster]


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_is_hinton_kd(T):
    rng = np.random.default_rng(7)
    s, t, y, alpha = rng.normal(size=(4, 6)) * 3, rng.normal(size=(4, 6)) * 3, rng.integers(6, size=4), 0.4
    total = 0.0
    for i in range(4):
        q1 = [math.exp(v) for v in s[i]]
        ce = -math.log(q1[y[i]] / sum(q1))
        pt = [math.exp(v / T) for v in t[i]]
        qs = [math.exp(v / T) for v in s[i]]
        pt, qs = [v / sum(pt) for v in pt], [v / sum(qs) for v in qs]
        kl = sum(p * math.log(p / q) for p, q in zip(pt, qs))
        total += (1 - alpha) * ce + alpha * T * T * kl
    got = kd_loss(torch.tensor(s), torch.tensor(y), torch.tensor(t), alpha, T)
    assert got.item() == pytest.approx(total / 4, rel=1e-9)
