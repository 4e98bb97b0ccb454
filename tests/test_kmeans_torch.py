"""The torch spherical k-means (CPU tensors here, CUDA where present) against real faiss."""
from __future__ import annotations

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import blobs, make_parquet_shards
from datapruning.cluster import assign, fit_kmeans
from datapruning.config import load_config
from datapruning.cluster.kmeans_torch import faiss_init_indices, torch_assign, torch_kmeans
from datapruning.runner import run_pipeline


def faiss_kmeans(x, k, niter, seed):
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed,
                      max_points_per_centroid=-(-len(x) // k), verbose=False)
    km.train(x)
    return km


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the labellings are equal up to a renaming of the labels."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("n, k, seed", [(1000, 10, 0), (5000, 64, 7), (257, 256, 1234), (40, 1, 3)])
def test_init_rows_are_faiss_rand_perm(n, k, seed):
    perm = np.zeros(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed + 1)
    np.testing.assert_array_equal(faiss_init_indices(n, k, seed), perm[:k])


def test_matches_faiss_on_separated_blobs():
    x, _ = blobs(3000, 32, 8, seed=4, spread=0.05)
    km = faiss_kmeans(x, 8, 20, seed=5)
    centroids, stats = torch_kmeans(x, 8, 20, seed=5, device="cpu")
    assert stats["precision"] == "fp32" and stats["device"] == "cpu"
    ours, _ = torch_assign(x, centroids, device="cpu")
    theirs = km.index.search(x, 1)[1][:, 0]
    # same init and same loop: the same local optimum, even with faiss's cluster numbering
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(centroids, km.centroids, atol=1e-5)
    assert stats["objective"] == pytest.approx(float(km.obj[-1]), rel=1e-5)


def covering_seed(truth: np.ndarray, k: int) -> int:
    """The first seed whose faiss init takes one point from every blob (so k-means can find the blobs)."""
    return next(s for s in range(1000) if len(set(truth[faiss_init_indices(len(truth), k, s)])) == k)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recovers_blobs_in_every_precision(precision):
    x, truth = blobs(4000, 32, 8, seed=4, spread=0.05)
    seed = covering_seed(truth, 8)
    centroids, _ = torch_kmeans(x, 8, 20, seed=seed, device="cpu", precision=precision)
    ours, _ = torch_assign(x, centroids, device="cpu", precision=precision)
    theirs = faiss_kmeans(x, 8, 20, seed).index.search(x, 1)[1][:, 0]
    assert same_partition(ours, truth)
    np.testing.assert_array_equal(ours, theirs)


def test_empty_clusters_split_like_faiss():
    """Ten distinct points repeated, twelve clusters: the init repeats points, so clusters come out empty
    and faiss's split rule (its own RNG stream) must pick the same clusters to split."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(10, 8))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    x = np.repeat(base, 50, axis=0).astype(np.float32)[rng.permutation(500)]
    for seed in range(3):
        km = faiss_kmeans(x, 12, 1, seed)
        centroids, stats = torch_kmeans(x, 12, 1, seed, device="cpu")
        assert stats["splits"] == km.iteration_stats[0]["nsplit"] > 0
        np.testing.assert_allclose(centroids, km.centroids, atol=1e-6)


def test_assign_matches_brute_force():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5000, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = rng.normal(size=(37, 24)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    cluster, cos_dist = torch_assign(x, c, batch=700, device="cpu")
    sims = x.astype(np.float64) @ c.T.astype(np.float64)
    best = sims.argmax(axis=1)
    top2 = np.sort(sims, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(cluster[clear], best[clear])
    np.testing.assert_allclose(cos_dist, 1 - sims[np.arange(len(x)), cluster], atol=2e-6)
    assert cluster.dtype == np.int64 and cos_dist.dtype == np.float32


def test_fit_and_assign_through_cluster_module():
    x, _ = blobs(2000, 16, 6, seed=9, spread=0.05)
    c_torch, stats = fit_kmeans(x, 6, 15, seed=0, backend="torch")
    c_faiss, _ = fit_kmeans(x, 6, 15, seed=0, backend="faiss")
    assert stats["backend"] == "torch" and stats["fit_points"] == 2000
    a_torch, d_torch = assign(x, c_torch, batch=512, backend="torch")
    a_faiss, d_faiss = assign(x, c_faiss, batch=512, backend="faiss")
    np.testing.assert_array_equal(a_torch, a_faiss)
    np.testing.assert_allclose(d_torch, d_faiss, atol=1e-5)


def test_pipeline_with_torch_backend_gives_faiss_clusters(tmp_path):
    inp = make_parquet_shards(tmp_path / "emb", n_shards=2, per_shard=60, d=16, k=4)[0].parent
    outs = {}
    for backend in ("torch", "faiss"):
        cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=4", f"cluster.backend={backend}"])
        run_pipeline(cfg, str(inp), tmp_path / backend)
        outs[backend] = pq.read_table(tmp_path / backend / "manifest")
    for col in ("uid", "cluster", "keep"):
        assert outs["torch"][col].equals(outs["faiss"][col]), col
    np.testing.assert_allclose(outs["torch"]["cos_dist"].to_numpy(), outs["faiss"]["cos_dist"].to_numpy(), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cuda_matches_cpu_and_is_deterministic(precision):
    x, truth = blobs(50000, 64, 8, seed=12, spread=0.05)  # seed 11 has no covering init among 1000 seeds
    seed = covering_seed(truth, 8)
    c_gpu, stats = torch_kmeans(x, 8, 20, seed=seed, device="cuda", precision=precision)
    c_gpu2, _ = torch_kmeans(x, 8, 20, seed=seed, device="cuda", precision=precision)
    c_cpu, _ = torch_kmeans(x, 8, 20, seed=seed, device="cpu")
    assert stats["device"] == "cuda" and stats["precision"] == precision
    np.testing.assert_array_equal(c_gpu, c_gpu2)  # one-hot GEMM update: no atomics
    np.testing.assert_allclose(c_gpu, c_cpu, atol=1e-3)
    a_gpu, d_gpu = torch_assign(x, c_gpu, device="cuda", precision=precision)
    a_cpu, d_cpu = torch_assign(x, c_cpu, device="cpu")
    np.testing.assert_array_equal(a_gpu, a_cpu)
    assert same_partition(a_gpu, truth)
    np.testing.assert_allclose(d_gpu, d_cpu, atol=1e-4)


@pytest.mark.gpu
def test_auto_backend_uses_the_gpu():
    from datapruning.cluster import resolve_backend

    assert resolve_backend("auto") in ("faiss-gpu", "torch")


def test_segment_sums_equal_index_add():
    import torch

    from datapruning.cluster.kmeans_torch import segment_sums

    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((3000, 16), dtype=np.float32))
    best = torch.from_numpy(rng.integers(0, 40, size=3000))
    best[best == 7] = 8  # an empty cluster sums to zero
    counts = torch.bincount(best, minlength=41)
    expect = torch.zeros(41, 16).index_add_(0, best, x)
    got = segment_sums(x, best, counts)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    assert float(got[7].abs().max()) == 0.0 and float(got[40].abs().max()) == 0.0
