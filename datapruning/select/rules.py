"""Per-block pieces of the selectors: columns in play, ranking keys, masks and counts (picklable, for workers)."""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

from ..cutoffs import Cutoffs, find_cutoffs
from ..errors import ConfigError
from ..metrics.ranking import order_key


def in_play(block: dict) -> np.ndarray:
    return block["eligible"] if "eligible" in block else np.ones(len(block["pos"]), dtype=bool)


def column(block: dict, name: str) -> np.ndarray:
    if name not in block:
        known = sorted(k for k in block if k.startswith("score_") or k in ("cos_dist", "cluster", "label"))
        raise ConfigError(f"select: no column {name!r} in the run; have {known}")
    return block[name]


def keys_by(score: str, mode: str, group: str | None, mask: Callable | None, block: dict) -> tuple:
    """(group, k0, k1, k2): rows in play (and in ``mask``) grouped by column ``group`` (one group if None),
    ranked by ``score`` in ``mode`` (``score`` None: rank by the tie key alone)."""
    ok = in_play(block) if mask is None else in_play(block) & mask(block)
    g = np.zeros(len(ok), np.int64) if group is None else column(block, group).astype(np.int64)
    g = np.where(ok & (g >= 0), g, -1)
    k0 = order_key(column(block, score), mode) if score else np.zeros(len(ok), np.uint64)
    return g, k0, block["tie"], block["pos"].astype(np.uint64)


def cut_mask(cut: Cutoffs, keys: Callable, block: dict) -> np.ndarray:
    return cut.keep(*keys(block))


def any_of(masks: tuple, block: dict) -> np.ndarray:
    out = np.zeros(len(block["pos"]), dtype=bool)
    for m in masks:
        out |= m(block)
    return out


def not_(mask: Callable, block: dict) -> np.ndarray:
    return ~mask(block)


def count_true(mask: Callable, block: dict) -> int:
    return int(np.count_nonzero(mask(block)))


def group_sizes(group: str, k: int, block: dict) -> np.ndarray:
    g = column(block, group)
    g = g[in_play(block) & (g >= 0)]
    return np.bincount(g, minlength=k)[:k] if k else np.bincount(g)


def in_groups(group: str, kept: np.ndarray, block: dict) -> np.ndarray:
    return in_play(block) & np.isin(column(block, group), kept)


def top_per_group(rows, score, mode, group, quotas, mask=None, sizes=None) -> Callable:
    """The rule keeping the first ``quotas[g]`` rows of every group by ``score``/``mode``."""
    keys = partial(keys_by, score, mode, group, mask)
    return partial(cut_mask, find_cutoffs(rows, keys, np.asarray(quotas, dtype=np.int64), sizes), keys)


def n_groups(rows, group: str) -> int:
    return int(rows.reduce(partial(max_id, group), max)) + 1


def max_id(group: str, block: dict) -> int:
    return int(column(block, group).max(initial=-1))
