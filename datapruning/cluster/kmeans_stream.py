"""Spherical k-means over a fit sample kept on disk: each iteration reads it back in chunks.

For fit samples larger than ``cluster.fit_mib``. Memory is one chunk, the centroids and their float64
sums, whatever the sample's size (k = 50,000 at d = 768 samples 39 GB). The loop is faiss's: the same
initial rows (``rand_perm(n, seed + 1)[:k]``), assignment by inner product with the stage's assignment
backend, the mean update, faiss's empty-cluster split and L2 renormalisation; sums are float64, so the
result does not depend on the chunk size. See docs/methods.md#clustering-spherical-k-means.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .kmeans import assign, unit_rows
from .kmeans_torch import faiss_init_indices, split_empty_clusters
from ..errors import ClusterError

CHUNK_BYTES = 16 << 20  # sample rows read per step (the step holds ~4x this: a sorted copy and float64 sums)


def read_rows(path: Path, d: int, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of a raw float32 [n, d] file, one seek each."""
    out = np.empty((len(rows), d), dtype=np.float32)
    with open(path, "rb") as fh:
        for j, r in enumerate(rows):
            fh.seek(int(r) * d * 4)
            fh.readinto(memoryview(out[j]).cast("B"))
    return out


def chunks(path: Path, n: int, d: int, rows: int) -> Iterator[np.ndarray]:
    """The file's rows, ``rows`` at a time, into one reused buffer."""
    buf = np.empty((min(rows, n), d), dtype=np.float32)
    with open(path, "rb") as fh:
        for start in range(0, n, rows):
            block = buf[:min(rows, n - start)]
            fh.readinto(memoryview(block).cast("B"))
            yield block


def chunk_sums(x: np.ndarray, best: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:
    """Add one chunk's per-cluster row sums (float64) and counts in place."""
    order = np.argsort(best, kind="stable")
    ids, starts = np.unique(best[order], return_index=True)
    sums[ids] += np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
    counts += np.bincount(best, minlength=len(counts))


def stream_kmeans(path: Path, n: int, d: int, k: int, niter: int, seed: int, backend: str = "faiss",
                  batch: int = 65536, early_stop: float = 0.0) -> tuple[np.ndarray, dict]:
    """Unit-norm float32 [k, d] centroids of the raw float32 [n, d] file ``path``; returns (centroids, stats)."""
    if k > n:
        raise ClusterError(f"k-means: k={k} is larger than the {n} points")
    rows = max(1, CHUNK_BYTES // (4 * d))
    centroids = unit_rows(read_rows(path, d, faiss_init_indices(n, k, seed)))
    objective, splits, done = None, 0, 0
    for _ in range(niter):
        sums, counts, obj = np.zeros((k, d)), np.zeros(k, np.int64), 0.0
        for x in chunks(path, n, d, rows):
            best, cos_dist = assign(x, centroids, batch, backend)
            obj += float(np.sum(1.0 - cos_dist.astype(np.float64)))
            chunk_sums(x, best, sums, counts)
        previous, objective = objective, obj
        centroids = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        if (counts == 0).any():
            splits += split_empty_clusters(counts.astype(np.float32), centroids, n)
        centroids = unit_rows(centroids)
        done += 1
        if previous is not None and abs(objective - previous) <= early_stop * abs(previous):
            break  # as faiss does: stop once the objective stops changing
    return centroids, {"objective": objective or 0.0, "iterations": done, "splits": splits, "streamed": True,
                       "backend": backend, "k": k, "niter": niter, "fit_points": n}
