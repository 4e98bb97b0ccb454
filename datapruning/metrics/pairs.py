"""SemDeDup's pairwise pass: bit-identical rows collapsed, then prefix maxima of similarities in row blocks.

See docs/methods.md#semdedup-semantic-deduplication. A cluster's rows in keep order become its *distinct* rows
(the first of every set of bit-identical rows, in the same order) and *queries* ``(r, L)``: the largest inner
product of distinct row ``r`` with the distinct rows ``0 .. L-1``. A row that first shows a vector asks
``(r, r)``: the distinct rows before it; a later copy of it asks ``(r, L)`` with L the distinct rows before the
copy, its own first included. Both equal the uncollapsed definition (the maximum over the earlier rows, copies
included), because a maximum over a multiset is the maximum over its distinct values, and each value is the
exact inner product rounded once (``exact.settle``): the collapse changes no bit, only the work (copies ask
prefix maxima of one row of similarities). The distinct rows are read through ``read(lo, hi)``, from memory or
from a file, so a pass can cover any range of row blocks in any task.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from .exact import dot_bound, exact_dot, row_max, row_norms, settle

HASH_CHUNK_BYTES = 16 << 20  # uint64 temporaries per step of the row hash
HASH_WORDS = 64  # float32 columns hashed per row (spread over the row): enough to tell real rows apart
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))

Read = Callable[[int, int], np.ndarray]  # (lo, hi) -> the distinct rows lo..hi-1 (float32 or float16 [hi-lo, d])


def row_hashes(x: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's float32 bits in ``HASH_WORDS`` columns spread over the row (uint64 [n]): equal
    rows hash equal; unequal ones rarely do, and ``first_copies`` compares the whole rows anyway."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = bits[:, ::max(1, bits.shape[1] // HASH_WORDS)]
    n, d = bits.shape
    mult = np.random.default_rng(d).integers(1, 1 << 63, size=d, dtype=np.uint64) | np.uint64(1)
    out = np.empty(n, dtype=np.uint64)
    step = max(1, HASH_CHUNK_BYTES // (8 * max(d, 1)))
    with np.errstate(over="ignore"):
        for s in range(0, n, step):
            h = (bits[s:s + step].astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)  # wraps: order-free
            h ^= h >> np.uint64(31)
            h *= _MIX[0]
            h ^= h >> np.uint64(29)
            h *= _MIX[1]
            out[s:s + step] = h ^ (h >> np.uint64(32))
    return out


def first_copies(hashes: np.ndarray, fetch: Callable[[np.ndarray], np.ndarray], step: int = 8192) -> np.ndarray:
    """For every row (in stream order) the position of the first row with the same bits (itself when none is
    earlier). ``hashes``: ``row_hashes`` of the rows; ``fetch(positions)`` reads rows, ``step`` at a time. Rows
    whose hash matches an earlier one are compared bit for bit with it; on a mismatch (a hash collision) the row
    stays its own."""
    m = len(hashes)
    order = np.argsort(hashes, kind="stable")
    h = hashes[order]
    start = np.r_[True, h[1:] != h[:-1]] if m else np.zeros(0, bool)
    head = order[np.maximum.accumulate(np.where(start, np.arange(m), 0))] if m else order
    ref = np.empty(m, dtype=np.int64)
    ref[order] = head
    check = np.flatnonzero(ref != np.arange(m))
    for s in range(0, len(check), step):
        rows = check[s:s + step]
        heads, at = np.unique(ref[rows], return_inverse=True)
        a = np.ascontiguousarray(fetch(rows), dtype=np.float32).view(np.uint32)
        b = np.ascontiguousarray(fetch(heads), dtype=np.float32).view(np.uint32)[at]
        bad = rows[(a != b).any(axis=1)]
        ref[bad] = bad
    return ref


@dataclass(frozen=True)
class Queries:
    """A cluster's collapsed pass: ``distinct`` (stream positions of its distinct rows, in keep order), the
    queries ``(rep, length)`` sorted and unique, and ``query`` (per row of the cluster, in keep order, its query)."""

    distinct: np.ndarray
    rep: np.ndarray
    length: np.ndarray
    query: np.ndarray


def plan_queries(first: np.ndarray) -> Queries:
    """The queries of one cluster from ``first`` (per row in keep order: a label shared by bit-identical rows,
    e.g. ``first_copies``' positions)."""
    m = len(first)
    _, first_at, inv = np.unique(first, return_index=True, return_inverse=True)
    is_first = np.zeros(m, dtype=bool)
    is_first[first_at] = True
    distinct = np.flatnonzero(is_first)  # keep positions of the distinct rows, in keep order
    rank = np.empty(len(first_at), dtype=np.int64)
    rank[np.argsort(first_at)] = np.arange(len(first_at))
    rep = rank[inv.reshape(-1)]
    length = np.cumsum(is_first) - is_first  # distinct rows strictly before each row
    key, query = np.unique(rep * (m + 1) + length, return_inverse=True)
    return Queries(distinct, key // (m + 1), key % (m + 1), query.reshape(-1))


@lru_cache(maxsize=8)
def upper_mask(width: int) -> np.ndarray:
    """The ``width`` x ``width`` mask that is True on and above the diagonal (made once per width, read-only)."""
    mask = np.triu(np.ones((width, width), dtype=bool))
    mask.flags.writeable = False
    return mask


def prefix_max(read: Read, rep: np.ndarray, length: np.ndarray, lo: int, hi: int, block_rows: int) -> np.ndarray:
    """float32 per query with ``lo <= rep < hi`` (``rep`` sorted; every distinct row has its own query
    ``(r, r)``): the exact ``max_{i < length} <x_i, x_rep>`` rounded once, -inf for length 0. Row blocks of
    ``block_rows`` from ``lo`` (a multiple of it): at most ``block_rows``² similarities at a time, a float32 GEMM
    whose uncertain entries ``exact.row_max`` recomputes in float64 (rows with later copies: float64 products)."""
    if lo % block_rows:
        raise AssertionError(f"prefix_max: lo={lo} is not a multiple of block_rows={block_rows}")
    e0, e1 = np.searchsorted(rep, [lo, hi])
    reps, lens = rep[e0:e1], length[e0:e1]
    best, bound = np.full(e1 - e0, -np.inf), np.zeros(e1 - e0)
    upper = upper_mask(min(block_rows, 1 << max(hi - lo - 1, 0).bit_length()))  # few widths: cached
    for r0 in range(lo, hi, block_rows):
        r1 = min(r0 + block_rows, hi)
        a, b = np.searchsorted(reps, [r0, r1])
        x_r = np.asarray(read(r0, r1), dtype=np.float32)
        r_norms = row_norms(x_r)
        local, counts = reps[a:b] - r0, np.bincount(reps[a:b] - r0, minlength=r1 - r0)
        multi = np.flatnonzero(counts > 1)  # rows with later copies: prefix maxima at several lengths
        m_ev = a + np.flatnonzero(counts[local] > 1)
        m_row, m_len = np.searchsorted(multi, reps[m_ev] - r0), lens[m_ev]
        x_multi = x_r[multi].astype(np.float64)
        plain = np.full(r1 - r0, -np.inf)
        run, cmax = np.full(len(multi), -np.inf), 0.0
        for c0 in range(0, int(lens[a:b].max(initial=0)), block_rows):
            c1 = min(c0 + block_rows, int(lens[a:b].max()))
            x_c = x_r if (c0, c1) == (r0, r1) else np.asarray(read(c0, c1), dtype=np.float32)
            c_top = float(row_norms(x_c).max())
            cmax = max(cmax, c_top)
            if c0 < r1:  # the diagonal block: only strictly earlier rows count
                diagonal = upper[: r1 - r0, : c1 - c0] if c0 == r0 else None
                np.maximum(plain, row_max(x_r, x_c, diagonal, r_norms, c_top), out=plain)
            if len(multi):
                acc = np.maximum.accumulate(x_multi @ x_c.astype(np.float64).T, axis=1)
                now = (m_len > c0) & (m_len <= c1)
                best[m_ev[now]] = np.maximum(run[m_row[now]], acc[m_row[now], m_len[now] - c0 - 1])
                np.maximum(run, acc[:, -1], out=run)
        p_ev = a + np.flatnonzero(counts[local] == 1)
        best[p_ev] = plain[reps[p_ev] - r0]
        bound[a:b] = dot_bound(x_r.shape[1], r_norms[local], cmax)

    def exact(j: int) -> float:
        """The exact maximum over the rows the bound cannot rule out (rare; blocked)."""
        x_j = np.asarray(read(int(reps[j]), int(reps[j]) + 1)[0], dtype=np.float64)
        top = -np.inf
        for c0 in range(0, int(lens[j]), block_rows):
            cols = np.asarray(read(c0, min(c0 + block_rows, int(lens[j]))), dtype=np.float64)
            for i in np.flatnonzero(cols @ x_j >= best[j] - 2.0 * bound[j]):
                top = max(top, exact_dot(cols[i], x_j))
        return top

    return settle(best, bound, exact)
