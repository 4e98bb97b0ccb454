"""Spherical k-means with faiss: the fit sample, unit centroids, assignment against brute force."""
from __future__ import annotations

import numpy as np
import pytest

from datapruning.errors import ClusterError
from datapruning.cluster import assign, fit_kmeans, resolve_backend, sample_indices
from datapruning.run import RunLayout
from conftest import blobs


def test_sample_indices():
    assert sample_indices(100, 5, None, 4, 0).tolist() == sorted(sample_indices(100, 5, None, 4, 0).tolist())
    assert len(sample_indices(100, 5, None, 4, 0)) == 20 and len(sample_indices(100, 5, 0.5, 4, 0)) == 50
    assert len(sample_indices(10, 5, None, 256, 0)) == 10
    assert (sample_indices(1000, 5, 0.1, 4, 1) != sample_indices(1000, 5, 0.1, 4, 2)).any()
    with pytest.raises(ClusterError, match="cluster.k=20 is larger than the 10 samples"):
        sample_indices(10, 20, None, 4, 0)


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


def test_streamed_fit_follows_faiss_and_ignores_the_chunk_size(tmp_path, monkeypatch):
    import datapruning.cluster.kmeans_stream as ks

    x, _ = blobs(3000, 24, 12, seed=5, spread=0.3)
    path = tmp_path / "sample.f32"
    x.tofile(path)
    ours, stats = ks.stream_kmeans(path, 3000, 24, 12, 15, seed=2)
    ref, ref_stats = fit_kmeans(x, 12, 15, seed=2)
    assert stats["streamed"] and np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    assert stats["objective"] == pytest.approx(ref_stats["objective"], rel=1e-5)
    assert (assign(x, ours)[0] == assign(x, ref)[0]).mean() > 0.995  # the same loop, float64 sums
    monkeypatch.setattr(ks, "CHUNK_BYTES", 24 * 4 * 7)  # 7 rows per read: 429 chunks
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
    assert (labels[1] == labels[64]).mean() > 0.99
