"""Spherical k-means (docs/methods.md#clustering-spherical-k-means): fit on a sample, assign in blocks."""
from __future__ import annotations

import logging

from typing import Callable, Iterator

import numpy as np

from .kmeans_torch import faiss_init_indices, split_empty_clusters
from ..errors import ClusterError
from ..metrics.exact import nearest, row_dots, unit_rows
from ..metrics.fixed import fixed_mean, fixed_sum

CENTROID_SCALE = 2.0 ** 31  # fixed-point units of the centroid sums: |x| <= 1 per coordinate, < 2**32 rows a cluster

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


def sample_size(n: int, k: int, fit_fraction: float | None, max_points_per_centroid: int) -> int:
    """Rows in the fit sample: ``fit_fraction * n``, else ``k * max_points_per_centroid``; at least k, at most n."""
    check_k(k, n)
    size = int(round(fit_fraction * n)) if fit_fraction is not None else k * max_points_per_centroid
    return max(k, min(n, size))


CHUNK_BYTES = 16 << 20  # sample rows assigned and summed per step (the step holds a few times this)


def lloyd(chunks: Callable[[], Iterator[np.ndarray]], n: int, init: np.ndarray, niter: int, backend: str = "faiss",
          batch: int = 65536) -> tuple[np.ndarray, dict]:
    """Spherical k-means iterations over the rows that ``chunks()`` yields (``n`` in all, the same order each
    time) from the centroids ``init``: exact assignment (``assign``), faiss's mean update and empty-cluster
    split, L2 renormalisation. The per-cluster sums are fixed point and updated by the rows that changed
    cluster, so they are exact: no order, chunk size or thread count changes a bit. Stops early once no row
    changes cluster and no cluster was split (the next iteration would repeat). Returns (unit float32 [k, d]
    centroids, stats; the objective is the float32 search's sum of similarities, a report only)."""
    k, d = init.shape
    centroids, objective, splits, done, split_last = unit_rows(init), 0.0, 0, 0, False
    sums, counts, prev = np.zeros((k, d), np.int64), np.zeros(k, np.int64), np.full(n, -1, np.int64)
    for _ in range(niter):
        start, moved_total, objective = 0, 0, 0.0
        for x in chunks():
            best, cos_dist = assign(x, centroids, batch, backend, exact=False)
            objective += float(np.sum(1.0 - cos_dist.astype(np.float64)))
            old = prev[start:start + len(x)]
            moved = np.flatnonzero(best != old)
            if len(moved):
                was, now = old[moved], best[moved]
                had = was >= 0
                sums += fixed_sum(x[moved], now, k, CENTROID_SCALE) - fixed_sum(x[moved[had]], was[had], k, CENTROID_SCALE)
                counts += np.bincount(now, minlength=k) - np.bincount(was[had], minlength=k)
                old[moved] = now
            start, moved_total = start + len(x), moved_total + len(moved)
        done += 1
        if moved_total == 0 and done > 1 and not split_last:
            break
        new = fixed_mean(sums, counts, CENTROID_SCALE).astype(np.float32)
        split_last = bool((counts == 0).any())
        if split_last:
            splits += split_empty_clusters(counts.astype(np.float32), new, n)
        centroids = unit_rows(new)
    return centroids, {"objective": objective, "iterations": done, "splits": splits}


def array_chunks(x: np.ndarray, rows: int) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: (x[s:s + rows] for s in range(0, len(x), rows))


def fit_kmeans(x: np.ndarray, k: int, niter: int, seed: int, backend: str = "auto",
               init: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Spherical k-means centroids (float32 [k, d], unit norm) from the fit sample ``x``; returns (centroids, stats).

    ``init``: the rows that start the centroids (default faiss's seeded pick, ``rand_perm(n, seed + 1)[:k]``;
    the cluster stage passes the rows with the smallest seeded uid hashes). On the CPU the result is the same
    on every machine and thread count (``lloyd``); ``faiss-gpu`` and ``torch`` (CUDA) follow the same loop in
    float32 on the GPU."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ClusterError(f"clustering needs a non-empty [n, d] array, got shape {x.shape}")
    if k > len(x):
        raise ClusterError(f"cluster.k={k} is larger than the {len(x)} samples; set cluster.k <= {len(x)}")
    backend = resolve_backend(backend)
    init = faiss_init_indices(len(x), k, seed) if init is None else np.asarray(init, dtype=np.int64)
    if backend == "torch":
        from .kmeans_torch import torch_kmeans

        centroids, stats = torch_kmeans(x, k, niter, seed, init=init)
        centroids = unit_rows(centroids)
    elif backend == "faiss-gpu":
        faiss = _faiss()
        km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, gpu=True,
                          max_points_per_centroid=max(1, -(-len(x) // k)), verbose=False)
        km.train(x, init_centroids=x[init])
        centroids = unit_rows(km.centroids)
        stats = {"objective": float(km.obj[-1]) if len(km.obj) else None}
    else:
        centroids, stats = lloyd(array_chunks(x, max(1, CHUNK_BYTES // (4 * x.shape[1]))), len(x), x[init], niter)
    stats.update(backend=backend, k=k, niter=niter, fit_points=len(x))
    return centroids, stats


def assign(x: np.ndarray, centroids: np.ndarray, batch: int = 65536, backend: str = "faiss",
           exact: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product, in blocks: (cluster int64 [n], cos_dist float32 [n]).

    On the CPU the result is bit-identical on every machine and thread count (``metrics.exact``): faiss's float32
    search proposes the best two centroids, a gap its error bound cannot explain settles the choice, the rest are
    compared in float64 and exactly; ``cos_dist = 1 - fl32(x . c)``. ``exact=False`` keeps the exact choice but
    returns faiss's float32 distance (k-means iterations only need the choice)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:  # an empty shard
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if x.shape[1] != centroids.shape[1]:
        raise ClusterError(f"embeddings have dimension {x.shape[1]} but the centroids {centroids.shape[1]}")
    if backend == "torch":
        from .kmeans_torch import torch_assign

        return torch_assign(x, centroids, batch)
    cluster = np.empty(len(x), dtype=np.int64)
    sim = np.empty(len(x), dtype=np.float32)
    faiss = _faiss()
    index = faiss.IndexFlatIP(centroids.shape[1])
    if backend == "faiss-gpu":
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    top = 1 if backend == "faiss-gpu" else min(2, len(centroids))
    for start in range(0, len(x), batch):
        block = np.ascontiguousarray(x[start:start + batch])
        d, i = index.search(block, top)
        sl = slice(start, start + len(block))
        if backend == "faiss-gpu":  # the GPU's own float32 result (not bit-identical to the CPU path)
            cluster[sl], sim[sl] = i[:, 0], d[:, 0]
            continue
        cluster[sl] = nearest(block, centroids, i, d)
        sim[sl] = row_dots(block, centroids, cluster[sl]) if exact else np.where(i[:, 0] == cluster[sl], d[:, 0],
                                                                                     d[:, -1])
    return cluster, (1.0 - sim).astype(np.float32)
