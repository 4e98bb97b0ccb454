"""Spherical k-means: the fit sample, unit centroids, assignment against brute force, the same bits anywhere."""
from __future__ import annotations

import numpy as np
import pytest

from datapruning.errors import ClusterError
from datapruning.cluster import assign, fit_kmeans, resolve_backend, sample_size
from datapruning.run import RunLayout
from conftest import blobs


def test_sample_size():
    assert sample_size(100, 5, None, 4) == 20 and sample_size(100, 5, 0.5, 4) == 50
    assert sample_size(10, 5, None, 256) == 10 and sample_size(1000, 5, 0.001, 4) == 5  # at least k
    with pytest.raises(ClusterError, match="cluster.k=20 is larger than the 10 samples"):
        sample_size(10, 20, None, 4)


def test_fit_and_assign_match_brute_force():
    x, truth = blobs(600, 16, 5, seed=3, spread=0.02)
    centroids, stats = fit_kmeans(x, 5, 25, seed=0)
    assert centroids.shape == (5, 16) and np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    assert stats["backend"] == resolve_backend("auto") == "faiss" and stats["fit_points"] == 600
    cluster, cos_dist = assign(x, centroids, batch=64)
    sims = x @ centroids.T
    np.testing.assert_array_equal(cluster, sims.argmax(1))
    np.testing.assert_allclose(cos_dist, 1 - sims.max(1), atol=1e-5)
    # the fit is seeded: the same call gives the same centroids
    np.testing.assert_array_equal(centroids, fit_kmeans(x, 5, 25, seed=0)[0])


def test_degenerate_inputs():
    same = np.tile(np.array([[0.6, 0.8]], np.float32), (8, 1))
    centroids, _ = fit_kmeans(same, 3, 10, seed=0)
    cluster, cos_dist = assign(same, centroids)
    assert np.isfinite(cos_dist).all() and len(set(cluster.tolist())) == 1
    assert assign(np.zeros((0, 2), np.float32), centroids)[0].shape == (0,)
    with pytest.raises(ClusterError, match="dimension"):
        assign(np.ones((2, 3), np.float32), centroids)
    with pytest.raises(ClusterError, match="cluster.k=9"):
        fit_kmeans(same, 9, 10, seed=0)


def test_fit_follows_faiss_from_the_same_start():
    import faiss
    from datapruning.cluster.kmeans_torch import faiss_init_indices

    x, _ = blobs(3000, 24, 12, seed=5, spread=0.3)
    ours, stats = fit_kmeans(x, 12, 15, seed=2)
    km = faiss.Kmeans(24, 12, niter=15, spherical=True, seed=2, max_points_per_centroid=3000)
    km.train(x, init_centroids=x[faiss_init_indices(3000, 12, 2)])
    assert stats["objective"] == pytest.approx(float(km.obj[-1]), rel=1e-5)
    assert (assign(x, ours)[0] == assign(x, km.centroids)[0]).mean() > 0.995  # faiss's loop, exact sums


def test_the_same_bits_whatever_the_summation_order():
    """Permuting the coordinates changes the order of every sum inside BLAS, faiss and numpy, as another
    machine, thread count or block size would: the fit, the assignment and cos_dist keep every bit."""
    x, _ = blobs(4000, 40, 16, seed=7, spread=0.4)
    perm = np.random.default_rng(1).permutation(40)
    xp = np.ascontiguousarray(x[:, perm])
    c, _ = fit_kmeans(x, 16, 12, seed=3)
    cp, _ = fit_kmeans(xp, 16, 12, seed=3)
    np.testing.assert_array_equal(cp, c[:, perm])
    for batch in (4000, 333):
        cluster, cos_dist = assign(xp, cp, batch=batch)
        np.testing.assert_array_equal(cluster, assign(x, c)[0])
        np.testing.assert_array_equal(cos_dist, assign(x, c)[1])


def test_assignment_near_ties_are_exact():
    """Rows exactly between two centroids, or a float32 rounding step from it, get the exact answer."""
    from datapruning.metrics.exact import exact_dot

    rng = np.random.default_rng(0)
    c = rng.normal(size=(2, 64)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    mid = (c[0] + c[1]) / 2
    x = np.stack([mid + t * (c[0] - c[1]) for t in (0, 1e-7, -1e-7, 3e-8, -3e-8)]).astype(np.float32)
    cluster, cos_dist = assign(x, c)
    for row, j, dist in zip(x, cluster, cos_dist):
        exact = [exact_dot(row, cj) for cj in c]
        assert j == int(np.argmax(exact))  # the lowest index wins an exact tie
        assert dist == np.float32(1.0) - np.float32(exact[j])


def test_streamed_fit_equals_the_in_memory_fit_whatever_the_chunk_size(tmp_path, monkeypatch):
    import datapruning.cluster.kmeans as km
    import datapruning.cluster.kmeans_stream as ks

    x, _ = blobs(3000, 24, 12, seed=5, spread=0.3)
    path = tmp_path / "sample.f32"
    x.tofile(path)
    ours, stats = ks.stream_kmeans(path, 3000, 24, 12, 15, seed=2)
    ref, ref_stats = fit_kmeans(x, 12, 15, seed=2)
    assert stats["streamed"] and np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(ours, ref)
    monkeypatch.setattr(km, "CHUNK_BYTES", 24 * 4 * 7)  # 7 rows per read: 429 chunks
    np.testing.assert_array_equal(ks.stream_kmeans(path, 3000, 24, 12, 15, seed=2)[0], ours)


def test_cluster_stage_streams_a_fit_sample_over_fit_mib(tmp_path):
    import json

    import pyarrow.parquet as pq
    from conftest import make_parquet_shards
    from datapruning.config import load_config
    from datapruning.runner import run_pipeline

    make_parquet_shards(tmp_path / "in", n_shards=3, per_shard=200, d=1024, k=4)
    labels = {}
    for mib in (1, 64):  # 600 x 1024 float32 = 2.3 MiB: streamed from disk at 1, in memory at 64
        cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=4", f"cluster.fit_mib={mib}"])
        out = tmp_path / f"run{mib}"
        run_pipeline(cfg, str(tmp_path / "in"), out, stages=("embed", "cluster"))
        fit = json.loads(RunLayout(out).fit_info.read_text())
        assert fit.get("streamed", False) == (mib == 1) and fit["fit_points"] == 600
        assert not list(out.rglob("fit_sample*"))  # the on-disk sample is removed after the fit
        labels[mib] = np.concatenate([pq.read_table(f, columns=["cluster"])["cluster"].to_numpy()
                                      for f in sorted((out / "clusters").glob("*.parquet"))])
    np.testing.assert_array_equal(labels[1], labels[64])  # the same fit from memory or from disk
