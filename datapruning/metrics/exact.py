"""Inner products whose float32 value depends on the two vectors alone: not on BLAS, threads or block shapes.

See docs/methods.md#bit-identical-inner-products. The product of two float32 numbers is exact in float64, so a
float64 dot product of float32 vectors differs from the exact one only by its summation order, by at most
``dot_bound`` (twice the worst case of any order). Each value is rounded once to float32; where the interval
``[v - bound, v + bound]`` straddles a float32 rounding boundary (rare: about one value in 10**5 at d = 1024),
it is recomputed exactly (``math.fsum`` of the exact products, correctly rounded) before rounding. Every result
is thus ``fl32(fl64(x . y))``. An argmax compares exactly the candidates the bound cannot separate, the lowest
index winning an exact tie.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

U64 = 2.0 ** -53  # unit roundoff of float64
U32 = 2.0 ** -24  # of float32 (a float32 GEMM: every product rounded too)
BLOCK_BYTES = 16 << 20  # float64 temporaries per step


def dot_bound(d: int, norm_a, norm_b, unit: float = U64):
    """Twice the worst-case rounding error of a ``d``-term dot product in any summation order:
    ``2 d u |a| |b|`` (Cauchy-Schwarz bounds the sum of the absolute products)."""
    return 2.0 * max(int(d), 1) * unit * np.asarray(norm_a, dtype=np.float64) * np.asarray(norm_b, dtype=np.float64)


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norms of the rows, float64 (only used to bound errors)."""
    x64 = np.asarray(x, dtype=np.float64)
    return np.sqrt(np.einsum("ij,ij->i", x64, x64))


def exact_dot(a: np.ndarray, b: np.ndarray) -> float:
    """The correctly rounded float64 of the exact inner product of two float32 (or float16) vectors."""
    return math.fsum((np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64)).tolist())


def settle(values: np.ndarray, bound: np.ndarray, exact: Callable[[int], float]) -> np.ndarray:
    """float32 of each value's exact counterpart, given float64 ``values`` within ``bound`` of it:
    ``exact(i)`` recomputes value i where the bound leaves its float32 rounding open."""
    v = np.asarray(values, dtype=np.float64)
    out = v.astype(np.float32)
    with np.errstate(invalid="ignore"):
        open_ = (v - bound).astype(np.float32) != (v + bound).astype(np.float32)
    for i in np.flatnonzero(open_ & np.isfinite(v)):
        out[i] = np.float32(exact(int(i)))
    return out


def row_dots(a: np.ndarray, b: np.ndarray, b_rows: np.ndarray | None = None) -> np.ndarray:
    """``fl32(a_i . b_i)`` for every row pair (float32 [n]), or ``a_i . b[b_rows[i]]`` when ``b_rows`` is given,
    in bounded float64 steps."""
    n, d = a.shape
    out = np.empty(n, dtype=np.float32)
    step = max(1, BLOCK_BYTES // (16 * max(d, 1)))
    for s in range(0, n, step):
        a64 = np.asarray(a[s:s + step], dtype=np.float64)
        b64 = np.asarray(b[s:s + step] if b_rows is None else b[b_rows[s:s + step]], dtype=np.float64)
        v = np.einsum("ij,ij->i", a64, b64)
        out[s:s + step] = settle(v, dot_bound(d, row_norms(a64), row_norms(b64)),
                                 lambda i, a64=a64, b64=b64: exact_dot(a64[i], b64[i]))
    return out


NEAR_TIES = 8  # more float32 candidates than this per row: recompute the whole block in float64 instead


def row_max(a: np.ndarray, b: np.ndarray, exclude: np.ndarray | None = None, a_norms: np.ndarray | None = None,
            b_norm: float | None = None) -> np.ndarray:
    """``max_j a_i . b_j`` for every row of ``a`` (float64 [n], ``-inf`` where every entry is excluded), within
    ``dot_bound`` of the exact maximum. A float32 GEMM proposes; the entries its error bound cannot rule out (the
    argmax, and near-ties) are recomputed in float64, or the whole block at once where near-ties are everywhere
    (duplicates). ``exclude``: a bool mask [n, m] of entries to leave out; the norms, when known, save a pass."""
    a32, b32 = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    s = a32 @ b32.T
    if exclude is not None:
        np.putmask(s, exclude, -np.inf)
    a_norms = row_norms(a32) if a_norms is None else a_norms
    b_norm = float(row_norms(b32).max(initial=0.0)) if b_norm is None else b_norm
    arg = s.argmax(axis=1) if s.shape[1] else np.zeros(len(s), np.int64)
    top = s[np.arange(len(s)), arg] if s.shape[1] else np.full(len(s), -np.inf, np.float32)
    thresh = top - 2.0 * dot_bound(a32.shape[1], a_norms, b_norm, U32)
    near = s >= thresh[:, None]
    count = np.count_nonzero(near, axis=1) * np.isfinite(top)
    if count.sum() > NEAR_TIES * len(a32):  # near-ties everywhere: one float64 GEMM is cheaper than gathers
        s64 = a32.astype(np.float64) @ b32.astype(np.float64).T
        if exclude is not None:
            np.putmask(s64, exclude, -np.inf)
        return s64.max(axis=1, initial=-np.inf)
    out = np.full(len(a32), -np.inf)
    one = np.flatnonzero(count == 1)
    out[one] = np.einsum("ij,ij->i", a32[one].astype(np.float64), b32[arg[one]].astype(np.float64))
    many = np.flatnonzero(count > 1)
    if len(many):
        r, cols = np.nonzero(near[many])
        v = np.einsum("ij,ij->i", a32[many[r]].astype(np.float64), b32[cols].astype(np.float64))
        starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])  # np.nonzero is row-major: rows ascend
        out[many[r[starts]]] = np.maximum.reduceat(v, starts)
    return out


def unit_rows(c: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), float32: ``c / sqrt(fl32(c . c))``, the same bits
    on every machine."""
    c = np.asarray(c, dtype=np.float32)
    norms = np.sqrt(row_dots(c, c))[:, None]
    return (c / np.where(norms > 0, norms, np.float32(1.0))).astype(np.float32)


def exact_argmax(x: np.ndarray, c: np.ndarray, sims: np.ndarray, bound: float) -> int:
    """The index of the largest exact ``x . c_j`` among the rows of ``c`` whose float64 similarity
    ``sims[j]`` lies within ``2 * bound`` of the largest (the lowest index wins an exact tie)."""
    cand = np.flatnonzero(sims >= sims.max() - 2.0 * bound)
    if len(cand) == 1:
        return int(cand[0])
    values = [exact_dot(x, c[j]) for j in cand]
    return int(cand[int(np.argmax(values))])


def nearest(x: np.ndarray, c: np.ndarray, top_idx: np.ndarray, top_sims: np.ndarray) -> np.ndarray:
    """The exact nearest row of ``c`` by inner product for every row of ``x`` (int64 [n]), from a float32
    search's best two (``top_idx``, ``top_sims``: [n, 1 or 2]). Where the float32 gap cannot separate the two,
    the row is compared with every centroid in float64, and exactly where that cannot either."""
    x = np.asarray(x)
    d = x.shape[1]
    best = np.asarray(top_idx[:, 0], dtype=np.int64).copy()
    if top_idx.shape[1] > 1 and len(x):
        nx, cmax = row_norms(x), float(row_norms(c).max())
        gap = top_sims[:, 0].astype(np.float64) - top_sims[:, 1].astype(np.float64)
        unsure = np.flatnonzero(~(gap > 2.0 * dot_bound(d, nx, cmax, U32)))
        c64 = np.asarray(c, dtype=np.float64)
        step = max(1, BLOCK_BYTES // (8 * len(c)))
        for s in range(0, len(unsure), step):
            rows = unsure[s:s + step]
            block = np.ascontiguousarray(x[rows])  # bit-identical rows (copies) are settled once
            _, first, inv = np.unique(block.view(np.dtype((np.void, block.itemsize * d))).ravel(), return_index=True,
                                      return_inverse=True)
            sims = np.asarray(block[first], dtype=np.float64) @ c64.T
            choice = [exact_argmax(block[i], c, sims[j], float(dot_bound(d, nx[rows[i]], cmax))) for j, i in
                      enumerate(first)]
            best[rows] = np.asarray(choice, dtype=np.int64)[inv.ravel()]
    return best


def argmax_dots(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``argmax_j x_i . w_j`` for every row (int64 [n]), exact (``nearest``): float32 GEMM blocks propose the
    best two, as faiss's search does in the cluster stage."""
    w = np.asarray(w, dtype=np.float32)
    out = np.empty(len(x), dtype=np.int64)
    step = max(1, BLOCK_BYTES // (4 * max(1, len(w))))
    for r0 in range(0, len(x), step):
        xb = np.asarray(x[r0:r0 + step], dtype=np.float32)
        s = xb @ w.T
        if len(w) > 1:
            top = np.argpartition(-s, 1, axis=1)[:, :2]
            vals = np.take_along_axis(s, top, axis=1)
            swap = vals[:, 1] > vals[:, 0]
            top[swap], vals[swap] = top[swap][:, ::-1], vals[swap][:, ::-1]
        else:
            top, vals = np.zeros((len(xb), 1), np.int64), s
        out[r0:r0 + step] = nearest(xb, w, top, vals)
    return out
