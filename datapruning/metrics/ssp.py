"""Self-supervised prototypicality (Sorscher et al., NeurIPS 2022).

See docs/methods.md#ssp-self-supervised-prototypicality.
"""
from __future__ import annotations

import numpy as np
from ..errors import InputError
from .exact import row_dots, unit_rows
from .fixed import fixed_sum


def prototypicality(embeddings: np.ndarray, centroids: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """``s_i = 1 - <x_i, c_a(i)>``: small = prototypical (easy), large = hard. The inner product is rounded once
    to float32 whatever the BLAS (``metrics.exact``), so with the cluster stage's assignment this equals its cos_dist.

    embeddings [N, d] and centroids [k, d] are L2-normalised; assignment [N] holds cluster ids.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    centroids = np.asarray(centroids, dtype=np.float32)
    assignment = np.asarray(assignment, dtype=np.int64)
    if embeddings.ndim != 2 or centroids.ndim != 2 or embeddings.shape[1] != centroids.shape[1]:
        raise InputError(f"prototypicality: embeddings {embeddings.shape} and centroids {centroids.shape} do not match")
    if len(assignment) != len(embeddings):
        raise InputError(f"prototypicality: {len(assignment)} assignments for {len(embeddings)} embeddings")
    if len(assignment) and (assignment.min() < 0 or assignment.max() >= len(centroids)):
        raise InputError(f"prototypicality: assignment outside [0, {len(centroids)})")
    return (1.0 - row_dots(embeddings, centroids, assignment)).astype(np.float64)  # float32 1 - fl32(x . c): the cluster stage's cos_dist, bit for bit


def class_prototypes(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Supervised variant: one normalised mean embedding per label. Returns (prototypes, codes)."""
    codes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    return prototypes_from_sums(fixed_sum(embeddings, inverse, len(codes))), inverse


def prototypes_from_sums(sums: np.ndarray) -> np.ndarray:
    """Class prototypes from each class's ``fixed_sum`` of embeddings: the normalised means, float32 [C, d]
    (exact sums, so they do not depend on row order or blocks)."""
    return unit_rows(np.asarray(sums, dtype=np.float64).astype(np.float32))


CDF_BINS = 1 << 16  # histogram bins over the cosine-distance range [0, 2]: a rank resolution of 3e-5


def distance_histogram(values: np.ndarray, source: np.ndarray, n_sources: int = 2,
                       bins: int = CDF_BINS) -> np.ndarray:
    """Counts of ``values`` (cosine distances in [0, 2]) per source and bin, int64 [n_sources, bins]."""
    values = np.asarray(values, dtype=np.float64)
    at = np.clip((values * (bins / 2.0)).astype(np.int64), 0, bins - 1)
    flat = np.asarray(source, dtype=np.int64) * bins + at
    return np.bincount(flat, minlength=n_sources * bins).reshape(n_sources, bins)


def within_source_cdf(values: np.ndarray, source: np.ndarray, hist: np.ndarray) -> np.ndarray:
    """Each value's rank within its own source on [0, 1]: the source's empirical CDF from ``hist``
    (``distance_histogram`` over every row), interpolated linearly inside the value's bin.

    ``cdf(v) = (count below v's bin + frac * count in v's bin) / source total``; it is strictly increasing in v
    within a source, so it keeps each source's order, and puts every source on the same [0, 1] scale."""
    values = np.asarray(values, dtype=np.float64)
    source = np.asarray(source, dtype=np.int64)
    bins = hist.shape[1]
    below = np.cumsum(hist, axis=1) - hist
    totals = np.maximum(hist.sum(axis=1), 1)
    scaled = np.clip(values, 0.0, 2.0) * (bins / 2.0)
    at = np.clip(scaled.astype(np.int64), 0, bins - 1)
    frac = np.clip(scaled - at, 0.0, 1.0)
    return (below[source, at] + frac * hist[source, at]) / totals[source]
