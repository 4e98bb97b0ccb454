"""Uids unique across shards: each shard's sorted uid hashes on disk, then one task per range of hash values.

Equal uids have equal seeded hashes (the ``tie`` column). The assignment writes each shard's hashes sorted;
a task per hash range reads that range from every shard (two binary searches and one slice per file), so
every hash is read once and a task holds about ``UNIQUE_BATCH`` of them, whatever N. A repeated hash is
confirmed on the uid strings (a collision of two uids is not a duplicate).
"""
from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import StageError
from ..io.files import write_raw
from ..run import Run, run_rows

UNIQUE_BATCH = 4_000_000  # hashes expected per range task (32 MB)
HASH = np.dtype("<u8")


def ties_path(run: Run, name: str) -> Path:
    return run.layout.ties / f"{name}.u64"


def write_ties(run: Run, name: str, tie: np.ndarray) -> Path:
    """Shard ``name``'s uid hashes, sorted; returns the file."""
    write_raw(ties_path(run, name), np.sort(np.asarray(tie, dtype=HASH)))
    return ties_path(run, name)


def hash_ranges(n: int, batch: int) -> list[tuple[int, int | None]]:
    """[lo, hi) ranges of 64-bit hash values expected to hold ``batch`` of ``n`` uniform hashes each; the last
    is open (hi None)."""
    parts = max(1, -(-n // max(batch, 1)))
    bounds = [i * 2**64 // parts for i in range(parts)]
    return list(zip(bounds, [*bounds[1:], None]))


def repeated_in(run: Run, names: list[str], bounds: tuple[int, int | None]) -> np.ndarray:
    """The hash values in [lo, hi) that occur more than once across the shards ``names``."""
    lo, hi = bounds
    found = []
    for name in names:
        path = ties_path(run, name)
        if not path.exists():
            raise StageError(f"{path} is missing; rerun 'datapruning cluster'")
        if path.stat().st_size == 0:
            continue
        ties = np.memmap(path, dtype=HASH, mode="r")
        a = int(np.searchsorted(ties, np.uint64(lo)))
        b = len(ties) if hi is None else int(np.searchsorted(ties, np.uint64(hi)))
        found.append(np.array(ties[a:b]))
        del ties
    ties = np.sort(np.concatenate(found)) if found else np.zeros(0, HASH)
    return np.unique(ties[1:][ties[1:] == ties[:-1]])


def _uids_with(ties: np.ndarray, block: dict) -> list:
    return block["uid"].filter(pa.array(np.isin(block["tie"], ties))).to_pylist()


def check_unique_uids(run: Run, n: int) -> None:
    """Stop when a uid repeats across shards (each shard's own repeats were dropped by the embed stage)."""
    names = [s["name"] for s in run.shards]
    found = list(run.executor.map_unordered(partial(repeated_in, run, names), hash_ranges(n, UNIQUE_BATCH)))
    repeated = np.concatenate(found) if found else np.zeros(0, HASH)
    if len(repeated):
        uids = run_rows(run, uid=True).reduce(partial(_uids_with, repeated), lambda parts: sum(parts, []))
        dup = sorted(u for u, c in Counter(uids).items() if c > 1)
        if dup:
            raise StageError(f"duplicate uid across shards: {dup[0]} (and {len(dup) - 1} more); "
                             "uids must be unique; fix the id column")
