"""Cluster-unit scores on disk: one file per group of clusters, rows sorted by shard, read back for a shard range.

``_meta/scores/parts/<metric>/g<group>.bin``: a header of int64 [shards + 1] record offsets (where each shard's
rows start), then packed (row int32, score float64) records sorted by (shard, row). A group's task writes one
file whatever the shard count, and a task scoring a range of shards reads one slice of each group's file.
See docs/scale.md#bytes-read-and-written-per-stage-1b-x-768.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import StageError
from ..io.files import atomic_path

RECORD = np.dtype([("row", "<i4"), ("score", "<f8")])  # 12 bytes, packed
HEADER = np.dtype("<i8")


def group_file(folder: Path, group: int) -> Path:
    return Path(folder) / f"g{group:05d}.bin"


def write_group_scores(path: Path, n_shards: int, shard: np.ndarray, row: np.ndarray, score: np.ndarray) -> None:
    """One group's scores (``shard``, ``row``, ``score`` aligned, any order) as one file, written atomically."""
    order = np.lexsort((row, shard))
    header = np.r_[0, np.cumsum(np.bincount(shard, minlength=n_shards))].astype(HEADER)
    records = np.empty(len(order), dtype=RECORD)
    records["row"], records["score"] = row[order], score[order]
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(header.tobytes())
        fh.write(records.tobytes())


def read_group_scores(path: Path, n_shards: int, s0: int, s1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard, row, score) of shards ``s0 .. s1-1`` in one group's file: two reads, whatever the group's size."""
    try:
        with open(path, "rb") as fh:
            fh.seek(s0 * HEADER.itemsize)
            at = np.fromfile(fh, dtype=HEADER, count=s1 - s0 + 1)
            fh.seek((n_shards + 1) * HEADER.itemsize + int(at[0]) * RECORD.itemsize)
            records = np.fromfile(fh, dtype=RECORD, count=int(at[-1] - at[0]))
    except (FileNotFoundError, IndexError):
        raise StageError(f"{path} is missing or cut short; delete it and rerun 'datapruning score'") from None
    if len(at) != s1 - s0 + 1 or len(records) != at[-1] - at[0]:
        raise StageError(f"{path} is cut short; delete it and rerun 'datapruning score'")
    shard = np.repeat(np.arange(s0, s1), np.diff(at))
    return shard, records["row"].astype(np.int64), records["score"]


def gather_scores(folder: Path, n_groups: int, n_shards: int, s0: int, s1: int, sizes: list[int]) -> list[np.ndarray]:
    """A cluster-unit metric's scores for shards ``s0 .. s1-1`` (``sizes``: their rows), one slice read from each
    group's file (NaN where no group wrote: unassigned rows)."""
    out = [np.full(n, np.nan) for n in sizes]
    for group in range(n_groups):
        shard, row, score = read_group_scores(group_file(folder, group), n_shards, s0, s1)
        for s in np.unique(shard):
            sel = shard == s
            out[int(s) - s0][row[sel]] = score[sel]
    return out
