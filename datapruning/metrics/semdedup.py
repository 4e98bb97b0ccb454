"""SemDeDup (Abbas et al. 2023): blocked within-cluster duplicate scores, eps masks and eps tuning.

See docs/methods.md#semdedup-semantic-deduplication.
"""
from __future__ import annotations

import logging
from functools import partial

import numpy as np
from tqdm.auto import tqdm

from .pairs import first_copies, plan_queries, prefix_max, row_hashes
from .ranking import order_key, rank_order
from ..cutoffs import find_cutoffs
from ..rows import ArrayRows, add
from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

FIRST_SCORE = -1.0  # the first member of a cluster (in keep order) has no earlier member to duplicate
DEFAULT_EPS = (0.0001, 0.00095, 0.005, 0.01, 0.03, 0.05, 0.1)
REPORT_KEEP_FRACTIONS = (0.9, 0.8, 0.7, 0.6, 0.5)
COLUMN = "score_semdedup"  # the run's column of duplicate scores
PROGRESS_MIN_ROWS = 200_000  # show a progress bar above this many rows to compare
STEP_BYTES = 16 << 20  # float32 rows hashed or compared per step


def cluster_ranges(cluster: np.ndarray, order: np.ndarray | None = None):
    """Yield ``(cluster_id, rows)`` per cluster, rows in the order of ``order`` (default: row order).
    One stable sort by cluster, then contiguous slices; rows with a negative cluster are skipped."""
    cluster = np.asarray(cluster, dtype=np.int64)
    order = np.arange(len(cluster)) if order is None else np.asarray(order)
    order = order[np.argsort(cluster[order], kind="stable")]
    ids = cluster[order]
    bounds = np.flatnonzero(np.diff(ids)) + 1
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(ids)]):
        if stop > start and ids[start] >= 0:
            yield int(ids[start]), order[start:stop]


def cluster_scores(fetch, m: int, d: int, block_rows: int) -> np.ndarray:
    """Duplicate scores (float64 [m]) of one cluster's ``m`` rows (width ``d``) in keep order, read by
    ``fetch(positions)``: bit-identical rows collapsed (``pairs``), then each row's largest similarity to the
    rows before it."""
    step = max(1, STEP_BYTES // (4 * max(d, 1)))
    hashes = np.concatenate([row_hashes(fetch(np.arange(s, min(s + step, m)))) for s in range(0, m, step)])
    q = plan_queries(first_copies(hashes, fetch, step))
    values = prefix_max(lambda lo, hi: fetch(q.distinct[lo:hi]), q.rep, q.length, 0, len(q.distinct), block_rows)
    return to_scores(values[q.query])


def to_scores(values: np.ndarray) -> np.ndarray:
    """float64 scores from ``prefix_max``'s values: -inf (no earlier row) -> -1, noise above 1 -> 1."""
    return np.clip(np.asarray(values, dtype=np.float64), FIRST_SCORE, 1.0)


def semdedup_scores(embeddings: np.ndarray, cluster: np.ndarray, cos_dist: np.ndarray, mode: str = "hard",
                    seed: int = 0, block_rows: int = 2048, tie: np.ndarray | None = None) -> np.ndarray:
    """Duplicate score per sample: the max cosine similarity to any member of its cluster that comes
    EARLIER in keep-preference order. Sample i is removed at ``eps`` iff ``score_i > 1 - eps``.

    Keep order within a cluster (SemDeDup, Abbas et al. 2023): ``hard`` = farthest from the centroid
    first (largest ``cos_dist``), ``easy`` = closest first, ``random`` = seeded permutation; so from
    every group of duplicates the preferred member survives. The first member scores -1.0, as do
    rows with a negative (unassigned) cluster. Equal distances break by ``tie`` (default: a seeded hash
    of the row index; the pipeline passes a seeded hash of the uid), then by row. Embeddings must be
    L2-normalised. Bit-identical rows are compared once (``pairs``: the scores are the same bits as without
    the collapse). Memory: one ``block_rows x block_rows`` float64 similarity block at a time.
    """
    if not hasattr(embeddings, "shape"):  # ndarray or np.memmap pass through without a copy
        embeddings = np.asarray(embeddings)
    cluster = np.asarray(cluster, dtype=np.int64)
    n = len(cluster)
    if embeddings.ndim != 2 or len(embeddings) != n or len(cos_dist) != n:
        raise InputError(f"semdedup: embeddings {embeddings.shape}, cluster {n} and cos_dist {len(cos_dist)} "
                         "rows differ")
    if int(block_rows) < 1:
        raise ConfigError(f"semdedup: block_rows must be >= 1, got {block_rows}")
    out = np.full(n, FIRST_SCORE, dtype=np.float64)
    order = rank_order(np.asarray(cos_dist, dtype=np.float64), mode, seed, tie)
    sizes = np.bincount(cluster[cluster >= 0]) if n else np.zeros(0, np.int64)
    work = int(sizes[sizes > 1].sum())
    with tqdm(total=work, unit="row", desc="semdedup", disable=work < PROGRESS_MIN_ROWS) as bar:
        for _, rows in cluster_ranges(cluster, order):
            if len(rows) > 1:
                out[rows] = cluster_scores(lambda at, rows=rows: embeddings[rows[at]], len(rows), embeddings.shape[1],
                                           int(block_rows))
                bar.update(len(rows))
    return out


def removal_mask(scores: np.ndarray, eps: float) -> np.ndarray:
    """Rows SemDeDup removes at ``eps``: ``score > 1 - eps`` (NaN scores are never removed). The one rule:
    every eps search, count and filter below applies it."""
    if not eps >= 0:
        raise ConfigError(f"semdedup: eps must be >= 0, got {eps}")
    with np.errstate(invalid="ignore"):
        return np.asarray(scores, dtype=np.float64) > 1.0 - float(eps)


def semdedup_masks(scores: np.ndarray, eps_list) -> tuple[dict[float, np.ndarray], dict[float, int]]:
    """Removal masks and removed counts for each eps: ``({eps: mask}, {eps: n_removed})``."""
    masks = {float(e): removal_mask(scores, e) for e in eps_list}
    return masks, {e: int(m.sum()) for e, m in masks.items()}


# ---- over rows seen block by block (a run's shards, or arrays in memory as one block) -------------------

def as_rows(scores_or_rows, column: str = COLUMN):
    """Rows as they are, or an array of scores as in-memory rows holding ``column``."""
    if hasattr(scores_or_rows, "reduce"):
        return scores_or_rows
    return ArrayRows({column: np.asarray(scores_or_rows, dtype=np.float64)})


def _removed(column: str, eps: tuple, block: dict) -> np.ndarray:
    """Per eps the rows removed, then the scored rows (one small array per block)."""
    s = block[column]
    return np.array([np.count_nonzero(removal_mask(s, e)) for e in eps] + [np.count_nonzero(~np.isnan(s))])


def _score_keys(column: str, copies: int, block: dict) -> tuple:
    """Rows ranked by score (easy: smallest first), once per target: copy f of every scored row is in group f."""
    s = block[column]
    g = np.where(np.isnan(s), -1, 0)
    k0, k2 = order_key(s, "easy"), block["pos"].astype(np.uint64)
    if copies == 1:
        return g, k0, block["tie"], k2
    groups = np.concatenate([np.where(g < 0, -1, f) for f in range(copies)])
    return groups, np.tile(k0, copies), np.tile(block["tie"], copies), np.tile(k2, copies)


def key_to_score(key: np.uint64) -> float:
    """The score whose ``order_key(., "easy")`` is ``key`` (the inverse of that encoding)."""
    top = np.uint64(1 << 63)
    bits = np.uint64(key) ^ top if np.uint64(key) & top else ~np.uint64(key)
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def _last_kept(keys, cut, copies: int, block: dict) -> np.ndarray:
    """Per target the largest key ``cut`` keeps in this block (uint64 [copies]; 0 where none)."""
    g, k0, k1, k2 = keys(block)
    kept = cut.keep(g, k0, k1, k2)
    out = np.zeros(copies, dtype=np.uint64)
    np.maximum.at(out, g[kept], k0[kept])
    return out


def _maximum(parts: list) -> np.ndarray:
    return np.maximum.reduce(parts)


def scored_count(rows, column: str = COLUMN) -> int:
    counts = rows.reduce(partial(_removed, column, ()), add)
    return int(counts[-1]) if counts is not None else 0


def eps_for_keep_fractions(scores, fractions, column: str = COLUMN, n: int | None = None) -> list[float]:
    """For each target keep fraction the largest eps that still keeps at least ``ceil(target * N)`` of the N
    scored rows, i.e. the smallest amount of deduplication that reaches it. ``scores``: an array, or rows (a
    run's, block by block, with ``column``); ``n``: the scored rows when already counted. One radix search
    finds every target's threshold score (``find_cutoffs``, a few passes whatever the number of targets). Ties
    in the scores can make the kept fraction overshoot; below the reachable minimum (one row per cluster is
    never removed at eps <= 2) the eps that keeps that minimum is returned."""
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"semdedup: keep fraction must be in [0, 1], got {f}")
    rows = as_rows(scores, column)
    n = scored_count(rows, column) if n is None else int(n)
    if n == 0:
        return [0.0] * len(fractions)
    want = np.array([min(max(int(np.ceil(f * n - 1e-9)), 1), n) for f in fractions], dtype=np.int64)
    keys = partial(_score_keys, column, len(want))
    cut = find_cutoffs(rows, keys, want, np.full(len(want), n))
    out = []
    for key in rows.reduce(partial(_last_kept, keys, cut, len(want)), _maximum):
        s = key_to_score(key)  # the want-th smallest score: rows with score <= 1 - eps stay
        eps = max(0.0, 1.0 - s)
        while eps > 0 and 1.0 - eps < s:  # undo float round-off in 1 - (1 - s): keep >= want rows
            eps = float(np.nextafter(eps, 0.0))
        out.append(float(eps))
    return out


def eps_for_keep_fraction(scores, target_keep_fraction: float, column: str = COLUMN) -> float:
    """``eps_for_keep_fractions`` for one target."""
    return eps_for_keep_fractions(scores, [target_keep_fraction], column)[0]


def removed_per_eps(rows, eps, column: str = COLUMN) -> dict:
    """``{str(eps): rows removed}`` for each eps (one pass)."""
    return dedup_summary(rows, eps, (), column)["removed"]


def dedup_summary(rows, eps, fractions, column: str = COLUMN) -> dict:
    """``{"removed": {str(eps): rows removed}, "eps_for_keep_fraction": {str(fraction): eps}}``: one pass
    counts the removed rows at every eps (and the scored rows), one radix search the eps for every fraction."""
    rows = as_rows(rows, column)
    counts = rows.reduce(partial(_removed, column, tuple(eps)), add)
    counts = np.zeros(len(eps) + 1, np.int64) if counts is None else counts
    found = eps_for_keep_fractions(rows, fractions, column, n=int(counts[-1])) if len(fractions) else []
    return {"removed": {str(e): int(c) for e, c in zip(eps, counts[:-1])},
            "eps_for_keep_fraction": {str(f): e for f, e in zip(fractions, found)}}


def not_duplicate(eps: float, column: str, block: dict) -> dict:
    """The block with ``eligible``: rows still in play that SemDeDup keeps at ``eps``."""
    keep = ~removal_mask(block[column], eps)
    return {**block, "eligible": keep & block["eligible"] if "eligible" in block else keep}


def _eligible(block: dict) -> int:
    return int(np.count_nonzero(block["eligible"]))


def dedup_step(rows, eps: float | None = None, keep_fraction: float | None = None, column: str = COLUMN):
    """The SemDeDup filter before a selector: give ``eps``, or ``keep_fraction`` to tune it. Returns
    ``(step, info)``: ``step(block)`` adds ``eligible``; info holds the eps and the kept/removed counts."""
    if (eps is None) == (keep_fraction is None):
        raise ConfigError("semdedup filter: give exactly one of eps (select.dedup_eps) or keep_fraction "
                          "(select.dedup_keep_fraction)")
    if eps is None:
        eps = eps_for_keep_fraction(rows, keep_fraction, column)
    step = partial(not_duplicate, float(eps), column)
    kept = int(rows.with_columns(step).reduce(_eligible, add) or 0)
    info = {"eps": float(eps), "kept": kept, "removed": rows.n - kept,
            "kept_fraction": kept / rows.n if rows.n else 0.0}
    if keep_fraction is not None:
        info["target_keep_fraction"] = float(keep_fraction)
    return step, info


def semdedup_filter(scores: np.ndarray, eps: float | None = None,
                    keep_fraction: float | None = None) -> tuple[np.ndarray, dict]:
    """``dedup_step`` on an array of scores: ``(eligible mask, info)``."""
    rows = as_rows(scores)
    step, info = dedup_step(rows, eps, keep_fraction)
    return step(rows.block)["eligible"], info
