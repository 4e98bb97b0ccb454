"""Spherical k-means (docs/methods.md#clustering-spherical-k-means): fit on a sample, assign in blocks."""
from __future__ import annotations

import logging

import numpy as np
from ..errors import ClusterError

log = logging.getLogger(__name__)


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ClusterError("clustering needs faiss: pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


def faiss_gpus() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_backend(backend: str) -> str:
    """``auto``: faiss-gpu when faiss sees a GPU, else torch k-means on CUDA, else faiss on CPU."""
    if backend != "auto":
        return backend
    if faiss_gpus() > 0:
        return "faiss-gpu"
    if not _may_have_cuda():  # importing torch only to ask costs ~0.5 GB and seconds
        return "faiss"
    try:
        import torch

        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    return "faiss"


def _may_have_cuda() -> bool:
    """True where torch is already loaded or an NVIDIA device node exists."""
    import sys
    from pathlib import Path

    return "torch" in sys.modules or Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def check_k(k: int, n: int) -> None:
    if k > n:
        raise ClusterError(f"cluster.k={k} is larger than the {n} samples; set cluster.k <= {n}")


def sample_indices(n: int, k: int, fit_fraction: float | None, max_points_per_centroid: int, seed: int) -> np.ndarray:
    """Sorted row indices of the uniform fit sample: ``fit_fraction * n`` rows, else ``k * max_points``."""
    check_k(k, n)
    size = int(round(fit_fraction * n)) if fit_fraction is not None else k * max_points_per_centroid
    size = max(k, min(n, size))
    if size == n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def unit_rows(c: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), float32."""
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    return (c / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def fit_kmeans(x: np.ndarray, k: int, niter: int, seed: int, backend: str = "auto") -> tuple[np.ndarray, dict]:
    """Spherical k-means centroids (float32 [k, d], unit norm) from the fit sample ``x``; returns (centroids, stats)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ClusterError(f"clustering needs a non-empty [n, d] array, got shape {x.shape}")
    if k > len(x):
        raise ClusterError(f"cluster.k={k} is larger than the {len(x)} samples; set cluster.k <= {len(x)}")
    backend = resolve_backend(backend)
    if backend == "torch":
        from .kmeans_torch import torch_kmeans

        centroids, stats = torch_kmeans(x, k, niter, seed)
    else:
        faiss = _faiss()
        km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, gpu=backend == "faiss-gpu",
                          max_points_per_centroid=max(1, -(-len(x) // k)), verbose=False)
        km.train(x)
        centroids = km.centroids.copy()
        stats = {"objective": float(km.obj[-1]) if len(km.obj) else None}
    stats.update(backend=backend, k=k, niter=niter, fit_points=len(x))
    return unit_rows(centroids), stats


def assign(x: np.ndarray, centroids: np.ndarray, batch: int = 65536, backend: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product, in blocks: (cluster int64 [n], cos_dist float32 [n])."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:  # an empty shard
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if x.shape[1] != centroids.shape[1]:
        raise ClusterError(f"embeddings have dimension {x.shape[1]} but the centroids {centroids.shape[1]}")
    cluster = np.empty(len(x), dtype=np.int64)
    sim = np.empty(len(x), dtype=np.float32)
    if backend == "torch":
        from .kmeans_torch import torch_assign

        return torch_assign(x, centroids, batch)
    faiss = _faiss()
    index = faiss.IndexFlatIP(centroids.shape[1])
    if backend == "faiss-gpu":
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids))
    for start in range(0, len(x), batch):
        d, i = index.search(np.ascontiguousarray(x[start:start + batch]), 1)
        sim[start:start + batch], cluster[start:start + batch] = d[:, 0], i[:, 0]
    return cluster, (1.0 - sim).astype(np.float32)
