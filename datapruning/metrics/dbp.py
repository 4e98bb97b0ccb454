"""Density-based pruning (Abbas et al., ICLR 2024): cluster complexity, softmax shares, exact quotas.

See docs/methods.md#dbp-density-based-pruning.
"""
from __future__ import annotations

import logging

import numpy as np

from .exact import dot_bound, exact_dot, settle, unit_rows
from .fixed import fixed_mean, fixed_sum
from ..errors import ConfigError, InputError


log = logging.getLogger(__name__)

BLOCK_ELEMS = 1 << 22  # 4M float32 (16 MiB) per centroid-similarity block; the partition copies it once more


def d_intra(cos_dist: np.ndarray, cluster: np.ndarray, k: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """``d_intra_j`` = mean of ``cos_dist`` over the (eligible) members of cluster j, float64 [k]
    (exact fixed-point sums; see ``d_intra_from_sums`` for clusters without a defined spread)."""
    cluster = np.asarray(cluster, dtype=np.int64)
    rows = cluster >= 0 if eligible is None else (cluster >= 0) & np.asarray(eligible, dtype=bool)
    if rows.any() and cluster[rows].max() >= k:
        raise InputError(f"d_intra: cluster id {int(cluster[rows].max())} >= k={k}")
    sums = fixed_sum(np.asarray(cos_dist, dtype=np.float64)[rows], cluster[rows], k)
    return d_intra_from_sums(sums, np.bincount(cluster[rows], minlength=k))


def d_intra_from_sums(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``d_intra`` from per-cluster ``fixed_sum`` sums of cos_dist and member counts. A cluster with fewer
    than two members has no defined spread, so it gets the mean over the clusters that do; if none do,
    the mean ``cos_dist`` over all members (0.0 when there are none)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    defined = sizes >= 2
    out = fixed_mean(np.where(defined, sums, 0), np.where(defined, sizes, 0))
    if defined.any():
        fill = float(out[defined].mean())
    else:
        fill = float(fixed_mean(sums.sum(keepdims=True), sizes.sum(keepdims=True))[0])
    out[~defined] = fill
    return out


def d_inter(centroids: np.ndarray, l: int = 20) -> np.ndarray:
    """``d_inter_j`` = mean of ``1 - <c_j, c_m>`` over the ``l`` nearest OTHER centroids (``l`` capped at
    k-1), float64 [k]. With k = 1 there is no other concept: d_inter = 1.0 (the distance to an
    orthogonal one), which leaves the single cluster's complexity equal to its d_intra.
    Similarities are computed in row blocks of at most ``BLOCK_ELEMS`` entries, each rounded once to float32
    (``metrics.exact``), so the result is the same on every machine."""
    c = np.asarray(centroids, dtype=np.float32)
    if c.ndim != 2 or len(c) == 0:
        raise ConfigError(f"d_inter: centroids must be a non-empty [k, d] array, got {c.shape}")
    if int(l) < 1:
        raise ConfigError(f"d_inter: l must be >= 1, got {l}")
    k = len(c)
    if k == 1:
        return np.ones(1)
    c = unit_rows(c)
    c64 = c.astype(np.float64)
    bound = float(dot_bound(c.shape[1], 1.0, 1.0) * 1.001)  # unit rows (to float32 precision)
    ll = min(int(l), k - 1)
    out = np.empty(k)
    step = max(1, BLOCK_ELEMS // k)
    for r0 in range(0, k, step):
        r1 = min(r0 + step, k)
        sims64 = c64[r0:r1] @ c64.T
        sims = settle(sims64.ravel(), bound, lambda i, r0=r0: exact_dot(c[r0 + i // k], c[i % k])).reshape(r1 - r0, k)
        sims[np.arange(r1 - r0), np.arange(r0, r1)] = -np.inf  # exclude self by index, not by value
        top = np.sort(np.partition(sims, k - ll, axis=1)[:, k - ll:], axis=1)  # the ll largest, in order
        out[r0:r1] = 1.0 - top.astype(np.float64).mean(axis=1)
    return out


def complexity(d_intra_: np.ndarray, d_inter_: np.ndarray) -> np.ndarray:
    """``C_j = d_inter_j * d_intra_j``."""
    return np.asarray(d_inter_, dtype=np.float64) * np.asarray(d_intra_, dtype=np.float64)


def dbp_shares(C: np.ndarray, tau: float = 0.1) -> np.ndarray:
    """Target shares ``P_j = softmax(C_j / tau)`` (max-shifted, so no overflow). Paper default tau = 0.1."""
    if not tau > 0:
        raise ConfigError(f"dbp: tau must be > 0, got {tau}")
    z = np.asarray(C, dtype=np.float64) / float(tau)
    if not np.isfinite(z).all():
        raise InputError("dbp: complexity has non-finite values")
    e = np.exp(z - z.max())
    return e / e.sum()


def project_capped_simplex(a: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: float) -> np.ndarray:
    """Exact Euclidean projection of ``a`` onto ``{n : sum n = total, lo <= n <= hi}``.

    The solution is ``n = clip(a - lam, lo, hi)``; ``f(lam) = sum n`` is piecewise linear and
    non-increasing with breakpoints ``a - hi`` and ``a - lo``. Bisect over the sorted breakpoints to
    the segment that brackets ``total``, then solve that linear piece exactly (no QP solver)."""
    a, lo, hi = (np.asarray(v, dtype=np.float64) for v in (a, lo, hi))
    if (lo > hi).any() or not lo.sum() <= total <= hi.sum():
        raise InputError(f"project_capped_simplex: infeasible (sum lo={lo.sum()}, total={total}, sum hi={hi.sum()})")
    f = lambda lam: np.clip(a - lam, lo, hi).sum()  # noqa: E731
    bps = np.unique(np.r_[a - hi, a - lo])  # f(bps[0]) = sum hi >= total >= sum lo = f(bps[-1])
    i, j = 0, len(bps) - 1
    while j - i > 1:
        mid = (i + j) // 2
        if f(bps[mid]) >= total:
            i = mid
        else:
            j = mid
    lam0, f0 = bps[i], f(bps[i])
    free = (a - hi < lam0 + 0.5 * (bps[j] - lam0)) & (a - lo > lam0 + 0.5 * (bps[j] - lam0))  # free on (bps[i], bps[j])
    lam = lam0 + (f0 - total) / free.sum() if free.any() and f0 > total else lam0
    return np.clip(a - lam, lo, hi)


def round_largest_remainder(x: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integers with ``sum == total`` and ``lo <= n <= hi``: floors, then +1 to the largest fractional
    parts (ties by lower index). Float slack in ``x`` is absorbed within the bounds."""
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    base = np.clip(np.floor(x + 1e-9).astype(np.int64), lo, hi)
    frac = np.clip(x - base, -1.0, 1.0)
    rest = int(total) - int(base.sum())
    idx = np.arange(len(x))
    if rest > 0:
        room = np.flatnonzero(base < hi)
        pick = room[np.lexsort((idx[room], -frac[room]))[:rest]]
        base[pick] += 1
    elif rest < 0:
        room = np.flatnonzero(base > lo)
        pick = room[np.lexsort((idx[room], frac[room]))[:-rest]]
        base[pick] -= 1
    if base.sum() != total:
        raise AssertionError(f"round_largest_remainder: could not reach {total} within the bounds")
    return base


def dbp_quotas(N: int, shares: np.ndarray, sizes: np.ndarray, min_per_cluster: int = 0) -> np.ndarray:
    """Integer quotas n [k] minimising ``||n - N P||^2`` s.t. ``sum n = N`` and ``lo_j <= n_j <= M_j``,
    ``lo_j = min(min_per_cluster, M_j)``: the exact capped-simplex projection, then largest-remainder
    rounding, so the sum is exactly N (the reference code's ``np.rint`` lets it drift)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    shares = np.asarray(shares, dtype=np.float64)
    if shares.shape != sizes.shape or (shares < 0).any() or (sizes < 0).any() or not shares.sum() > 0:
        raise ConfigError("dbp_quotas: shares and sizes must be non-negative [k] arrays with shares summing > 0")
    N = int(N)
    if N < 0 or N > sizes.sum():
        raise InputError(f"dbp_quotas: cannot keep N={N} from {int(sizes.sum())} samples")
    lo = np.minimum(int(min_per_cluster), sizes)
    if lo.sum() > N:
        raise InputError(f"dbp_quotas: min_per_cluster={min_per_cluster} needs {int(lo.sum())} samples > N={N}")
    x = project_capped_simplex(N * shares / shares.sum(), lo, sizes, N)
    return round_largest_remainder(x, N, lo, sizes)
