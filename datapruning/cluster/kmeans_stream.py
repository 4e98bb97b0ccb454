"""Spherical k-means over a fit sample kept on disk: each iteration reads it back in chunks.

For fit samples larger than ``cluster.fit_mib``. Memory is one chunk, the centroids and their fixed-point sums,
whatever the sample's size (k = 50,000 at d = 768 samples 39 GB). The iterations are ``kmeans.lloyd``, the same
as in memory: the sums are exact, so the result equals the in-memory fit's bit for bit, whatever the chunk size.
See docs/methods.md#clustering-spherical-k-means.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from . import kmeans
from .kmeans_torch import faiss_init_indices
from ..errors import ClusterError


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


def stream_kmeans(path: Path, n: int, d: int, k: int, niter: int, seed: int, backend: str = "faiss",
                  batch: int = 65536, init: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Unit-norm float32 [k, d] centroids of the raw float32 [n, d] file ``path``; returns (centroids, stats).
    ``init``: the starting rows (default faiss's seeded pick, as ``kmeans.fit_kmeans``)."""
    if k > n:
        raise ClusterError(f"k-means: k={k} is larger than the {n} points")
    rows = max(1, kmeans.CHUNK_BYTES // (4 * d))
    init = faiss_init_indices(n, k, seed) if init is None else np.asarray(init, dtype=np.int64)
    centroids, stats = kmeans.lloyd(lambda: chunks(path, n, d, rows), n, read_rows(path, d, init), niter, backend,
                                    batch)
    return centroids, {**stats, "streamed": True, "backend": backend, "k": k, "niter": niter, "fit_points": n}
