"""Exact per-group top-q over rows seen block by block, in bounded memory.

Rows are ranked by the total order ``(k0, k1, k2)`` ascending: ``k0 = order_key(score, mode)``, ``k1`` the
seeded tie hash, ``k2`` the global row (unique, so the order is strict). For each group g the first
``quota[g]`` rows are kept. A radix search finds each group's boundary: a histogram pass over the next
``B`` bits of the key narrows every group to one bin, until the rows left in the boundary bins fit in
memory (``COLLECT_LIMIT``); one pass then collects them and sorts exactly. The result is a bound per group,
``keep iff key < bound``, which any block can apply on its own. Memory: ``groups x 2**B`` counters plus
the collected rows; never one entry per row of the run, and never more than ``COUNTERS`` cells per pass
whatever the number of groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from .rows import add, concat

COLLECT_LIMIT = 250_000  # boundary rows gathered in one pass (32 bytes each): memory flat in N
COUNTERS = 1 << 22  # histogram cells per pass (groups x bins)
KEY_BITS = 192
NONE, ALL, BOUND = 0, 1, 2
U64 = np.uint64

# keys(block) -> (group int64 [-1 = not in play], k0, k1, k2 uint64)
Keys = Callable[[dict], tuple]


@dataclass(frozen=True)
class Cutoffs:
    """Per group: ``kind`` NONE (keep nothing), ALL (keep every row) or BOUND (keep rows whose key is below
    ``bound``, a [G, 3] uint64 array); ``sizes`` the rows in play and ``quotas`` the kept count per group."""

    kind: np.ndarray
    bound: np.ndarray
    sizes: np.ndarray
    quotas: np.ndarray

    def keep(self, group: np.ndarray, k0: np.ndarray, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        g = np.asarray(group, dtype=np.int64)
        valid = (g >= 0) & (g < len(self.kind))
        gi = np.where(valid, g, 0)
        kind = self.kind[gi] if len(self.kind) else np.zeros(len(g), np.int8)
        b = self.bound[gi] if len(self.kind) else np.zeros((len(g), 3), np.uint64)
        less = (k0 < b[:, 0]) | ((k0 == b[:, 0]) & ((k1 < b[:, 1]) | ((k1 == b[:, 1]) & (k2 < b[:, 2]))))
        return valid & ((kind == ALL) | ((kind == BOUND) & less))


def _digit_bits(n_groups: int) -> int:
    """The widest digit (at most 16 bits) whose histogram over ``n_groups`` groups fits ``COUNTERS`` cells."""
    room = COUNTERS // max(int(n_groups), 1)
    return max(1, min(16, room.bit_length() - 1))


def _digit(k0, k1, k2, start: int, bits: int) -> np.ndarray:
    """The ``bits``-wide digit of the 192-bit key from bit ``start`` (from the top; within one 64-bit word)."""
    word = (k0, k1, k2)[start // 64]
    shift = U64(64 - bits - start % 64)
    return ((word >> shift) & U64((1 << bits) - 1)).astype(np.int64)


def _prefix_match(keys: tuple, prefix: np.ndarray, nbits: int) -> np.ndarray:
    """Rows whose key's top ``nbits`` equal ``prefix`` ([n, 3] uint64, the row's group's prefix)."""
    ok = np.ones(len(keys[0]), dtype=bool)
    for w in range(3):
        used = min(max(nbits - 64 * w, 0), 64)
        if used == 0:
            break
        shift = U64(64 - used)
        ok &= (keys[w] >> shift) == (prefix[:, w] >> shift) if used < 64 else keys[w] == prefix[:, w]
    return ok


def _count(keys: Keys, n_groups: int, block: dict) -> np.ndarray:
    g = keys(block)[0]
    return np.bincount(g[g >= 0], minlength=n_groups)[:n_groups].astype(np.int64, copy=False)


def _candidates(keys: Keys, active: np.ndarray, prefix: np.ndarray, nbits: int, block: dict):
    g, k0, k1, k2 = keys(block)
    gi = np.where(g >= 0, g, 0)
    rows = (g >= 0) & active[gi]
    if nbits:
        rows[rows] = _prefix_match((k0[rows], k1[rows], k2[rows]), prefix[g[rows]], nbits)
    return g[rows], k0[rows], k1[rows], k2[rows]


def _hist(keys: Keys, slot: np.ndarray, n_slots: int, bits: int, start: int, prefix, block: dict) -> np.ndarray:
    """Counts per (slot, digit) of the rows in the groups that have a ``slot`` (>= 0) and match their prefix:
    ``n_slots << bits`` cells, whatever the number of groups."""
    g, k0, k1, k2 = _candidates(keys, slot >= 0, prefix, start, block)
    cells = slot[g] * (1 << bits) + _digit(k0, k1, k2, start, bits)
    return np.bincount(cells, minlength=n_slots << bits)


def _collect(keys: Keys, active, prefix, nbits: int, block: dict):
    g, k0, k1, k2 = _candidates(keys, active, prefix, nbits, block)
    return g.astype(np.int64), k0, k1, k2


def _set_digit(prefix: np.ndarray, rows: np.ndarray, digit: np.ndarray, start: int, bits: int) -> None:
    w, shift = start // 64, U64(64 - bits - start % 64)
    prefix[rows, w] |= digit.astype(np.uint64) << shift


def _next_bin(prefix_rows: np.ndarray, start: int, bits: int) -> np.ndarray:
    """The 192-bit value where the bin after each prefix starts (prefix + one unit of the digit at ``start``),
    carried."""
    out = prefix_rows.copy()
    w, unit = start // 64, U64(1) << U64(64 - bits - start % 64)
    carry = np.ones(len(out), dtype=bool)
    add_val = np.full(len(out), unit, dtype=np.uint64)
    for word in range(w, -1, -1):
        with np.errstate(over="ignore"):
            new = out[:, word] + np.where(carry, add_val, U64(0))
        overflow = carry & (new < out[:, word])
        out[:, word] = new
        carry, add_val = overflow, np.full(len(out), U64(1), dtype=np.uint64)
        if not carry.any():
            break
    out[carry] = np.uint64(0xFFFFFFFFFFFFFFFF)  # past the largest key: every row is below
    return out


def find_cutoffs(rows, keys: Keys, quotas: np.ndarray, sizes: np.ndarray | None = None) -> Cutoffs:
    """Exact bounds keeping the first ``quotas[g]`` rows of each group g by key (see the module doc).
    ``sizes`` (rows in play per group) is counted with one pass when not given. Each radix pass histograms
    the groups still open: the digit is as wide as ``COUNTERS`` cells allow for their number (up to 16 bits),
    and more groups than fit one-bit digits are histogrammed in several passes."""
    quotas = np.asarray(quotas, dtype=np.int64)
    G = len(quotas)
    if sizes is None:
        sizes = rows.reduce(partial(_count, keys, G)) if G else np.zeros(0, np.int64)
        sizes = np.zeros(G, np.int64) if sizes is None else sizes
    quotas = np.minimum(np.maximum(quotas, 0), sizes)
    kind = np.full(G, BOUND, dtype=np.int8)
    kind[quotas == sizes] = ALL
    kind[quotas == 0] = NONE
    bound = np.zeros((G, 3), dtype=np.uint64)
    prefix = np.zeros((G, 3), dtype=np.uint64)
    need = quotas.copy()
    active = kind == BOUND
    start, in_bins = 0, int(sizes[active].sum())
    while active.any() and in_bins > COLLECT_LIMIT and start < KEY_BITS:
        open_ids = np.flatnonzero(active)
        bits = min(_digit_bits(len(open_ids)), 64 - start % 64)
        per_pass = max(1, COUNTERS >> bits)
        in_bins = 0
        for c0 in range(0, len(open_ids), per_pass):
            ids = open_ids[c0:c0 + per_pass]
            slot = np.full(G, -1, dtype=np.int64)
            slot[ids] = np.arange(len(ids))
            hist = rows.reduce(partial(_hist, keys, slot, len(ids), bits, start, prefix)).reshape(len(ids), 1 << bits)
            cum = np.cumsum(hist, axis=1)
            b = (cum < need[ids, None]).sum(axis=1)  # first bin where the running count reaches the need
            below = np.where(b > 0, cum[np.arange(len(ids)), np.maximum(b - 1, 0)], 0)
            need[ids] -= below
            _set_digit(prefix, ids, b, start, bits)
            in_bin = hist[np.arange(len(ids)), b]
            whole = need[ids] == in_bin  # the whole boundary bin is kept: keep everything below the next bin
            bound[ids[whole]] = _next_bin(prefix[ids[whole]], start, bits)
            active[ids[whole]] = False
            in_bins += int(in_bin[~whole].sum())
        start += bits
    if active.any():
        g, k0, k1, k2 = rows.reduce(partial(_collect, keys, active, prefix, start), concat)
        order = np.lexsort((k2, k1, k0, g))
        g, k0, k1, k2 = g[order], k0[order], k1[order], k2[order]
        ids = np.flatnonzero(active)
        at = np.searchsorted(g, ids) + need[ids] - 1  # the last kept row of each group
        last = np.stack([k0[at], k1[at], k2[at]], axis=1)
        bound[ids] = _next_bin(last, KEY_BITS - 1, 1)  # last + 1 in the lowest bit
    return Cutoffs(kind, bound, sizes, quotas)


def keep_mask(cut: Cutoffs, keys: Keys, block: dict) -> np.ndarray:
    """The rows of ``block`` that ``cut`` keeps."""
    return cut.keep(*keys(block))


def count_kept(cut: Cutoffs, keys: Keys, block: dict) -> int:
    return int(keep_mask(cut, keys, block).sum())


__all__ = ["Cutoffs", "find_cutoffs", "keep_mask", "count_kept", "add", "COLLECT_LIMIT"]
