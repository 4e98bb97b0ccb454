"""Per-row numeric columns seen one block at a time, and map-reduce over the blocks.

``RunRows`` (``BlockRows`` over a run's shards) and ``ArrayRows`` (arrays in memory) look the same to a stage:
it maps a small function over the blocks and combines the small results (counts, histograms, a bounded
set of candidate rows), never holding every row.

A block is a dict of equal-length numpy arrays: ``pos`` (int64 global row), ``cluster`` (int64, -1 when
unassigned), ``cos_dist`` (float64), ``tie`` (uint64 seeded uid hash), ``label`` (int64 code, -1 unknown;
absent without labels), ``score_<metric>`` (float64) and whatever a stage derives from those.
"""
from __future__ import annotations

from functools import partial, reduce
from typing import Any, Callable, Protocol

import numpy as np

from .exec import Executor
from .hashing import row_hash


def _add2(a, b):
    if isinstance(a, tuple):
        return tuple(_add2(x, y) for x, y in zip(a, b))
    return a + b


def add(parts: list):
    """Combine partial results by adding them: arrays and numbers, or tuples of them element-wise."""
    return reduce(_add2, parts)


def concat(parts: list) -> tuple:
    """Combine partial results that are tuples of arrays by concatenating each (callers sort afterwards)."""
    return tuple(np.concatenate(cols) for cols in zip(*parts))


class Rows(Protocol):
    """What every stage and importable function reads rows through: ``n`` rows, seen as blocks."""

    n: int

    def reduce(self, fn: Callable[[dict], Any], combine: Callable = add) -> Any:
        """``combine`` of ``fn(block)`` over every block (small results: counts, histograms, candidates)."""

    def map(self, fn: Callable[[dict], Any]) -> list:
        """``fn(block)`` for every block, in no particular order (work with side effects, e.g. writers)."""

    def with_columns(self, fn: Callable[[dict], dict]) -> "Rows":
        """The same rows with ``fn(block)`` (the block, extended) applied to every block first."""


class ArrayRows:
    """In-memory rows: one block holding every column (the importable functions, eval and the tests)."""

    def __init__(self, columns: dict[str, np.ndarray], seed: int = 0):
        n = len(next(iter(columns.values()))) if columns else 0
        block = {k: np.asarray(v) for k, v in columns.items()}
        block.setdefault("pos", np.arange(n, dtype=np.int64))
        block.setdefault("tie", row_hash(n, seed))
        self.block, self.n = block, n

    def reduce(self, fn: Callable[[dict], Any], combine: Callable = add) -> Any:
        return combine([fn(self.block)])

    def map(self, fn: Callable[[dict], Any]) -> list:
        return [fn(self.block)]

    def with_columns(self, fn: Callable[[dict], dict]) -> "ArrayRows":
        out = ArrayRows.__new__(ArrayRows)
        out.block, out.n = fn(dict(self.block)), self.n
        return out


def _apply(read: Callable[[Any], dict], derive: tuple, fn: Callable, item) -> Any:
    block = read(item)
    for d in derive:
        block = d(block)
    return fn(block)


class BlockRows:
    """Rows read block by block with ``read(item)`` for each of ``items`` (the run's shards), each block
    passed through ``derive`` functions (added columns such as an eligibility mask) before ``fn``.
    The work runs on ``executor``: in this process, a process pool, or Ray tasks."""

    def __init__(self, read: Callable[[Any], dict], items: list, n: int, executor: Executor | None = None,
                 derive: tuple = ()):
        self.read, self.items, self.n, self.derive = read, list(items), int(n), tuple(derive)
        self.executor = executor or Executor()

    def with_columns(self, fn: Callable[[dict], dict]) -> "BlockRows":
        """The same rows with ``fn(block)`` applied to every block first (it returns the block, extended)."""
        return BlockRows(self.read, self.items, self.n, self.executor, self.derive + (fn,))

    def _map(self, fn: Callable[[dict], Any]):
        return self.executor.map_unordered(partial(_apply, self.read, self.derive, fn), self.items)

    def reduce(self, fn: Callable[[dict], Any], combine: Callable = add) -> Any:
        results = self._map(fn)
        if combine is concat:  # bounded candidate rows: gather, then one concatenation
            parts = list(results)
            return combine(parts) if parts else None
        acc = None  # fold as results arrive: memory stays one partial result, whatever the shard count
        for part in results:
            acc = part if acc is None else combine([acc, part])
        return acc

    def map(self, fn: Callable[[dict], Any]) -> list:
        """``fn(block)`` for every block, in no particular order (for work with side effects, e.g. writers)."""
        return list(self._map(fn))
