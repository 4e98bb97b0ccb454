"""The cluster stage's grouped copy of each shard: its rows sorted by cluster in raw files, with per-group offsets.

Per shard, in the cluster stage's meta folder (``RunLayout.parts``): ``<shard>.emb`` (the embeddings in the embed stage's dtype, row-major),
``<shard>.meta`` (row, cluster, cos_dist, tie; packed records) and ``<shard>.idx`` (int64 [groups + 1]: where each
group of clusters starts). Three files per shard whatever the number of groups; reading one group seeks into
every shard's files and reads only that group's rows. See docs/scale.md#how-the-stages-scale.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import StageError
from ..io.files import write_raw
from ..run import Run

META = np.dtype([("row", "<i4"), ("cluster", "<i4"), ("cos_dist", "<f4"), ("tie", "<u8")])  # 20 bytes, packed
INDEX = np.dtype("<i8")


def parts_dir(run: Run) -> Path:
    return run.layout.parts


def emb_dtype(run: Run) -> np.dtype:
    """The partitions keep the embed stage's storage precision."""
    return np.dtype("<f2") if run.cfg.embed.store_dtype == "float16" else np.dtype("<f4")


def write_parts(run: Run, name: str, matrix: np.ndarray, cluster: np.ndarray, cos_dist: np.ndarray,
                tie: np.ndarray, groups: np.ndarray) -> list[Path]:
    """Write shard ``name``'s rows sorted by (cluster, row) with the start of each group of clusters; the
    index file is written last. Returns the three files."""
    order = np.lexsort((np.arange(len(cluster)), cluster))
    meta = np.empty(len(order), dtype=META)
    meta["row"], meta["cluster"] = order, cluster[order]
    meta["cos_dist"], meta["tie"] = cos_dist[order], tie[order]
    counts = np.bincount(groups[cluster[order]], minlength=int(groups.max()) + 1)
    out = parts_dir(run)
    write_raw(out / f"{name}.emb", matrix[order].astype(emb_dtype(run), copy=False))
    write_raw(out / f"{name}.meta", meta)
    write_raw(out / f"{name}.idx", np.r_[0, np.cumsum(counts)].astype(INDEX))
    return [out / f"{name}.emb", out / f"{name}.meta", out / f"{name}.idx"]


def _read(path: Path, dtype: np.dtype, start: int, count: int) -> np.ndarray:
    """``count`` items of ``dtype`` from item ``start`` of a raw file; a short read names the file."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start * dtype.itemsize)
            out = np.fromfile(fh, dtype=dtype, count=count)
    except FileNotFoundError:
        raise StageError(f"{path} is missing; rerun 'datapruning cluster'") from None
    if len(out) != count:
        raise StageError(f"{path} is truncated ({len(out)} of {count} items at {start}); rerun 'datapruning cluster'")
    return out


def group_spans(run: Run, group: int) -> list[tuple[int, str, int, int]]:
    """(shard index, shard name, first row, end row) of ``group`` in every shard's sorted copy that holds it."""
    out = parts_dir(run)
    spans = []
    for i, shard in enumerate(run.shards):
        lo, hi = (int(v) for v in _read(out / f"{shard['name']}.idx", INDEX, group, 2))
        if hi > lo:
            spans.append((i, shard["name"], lo, hi))
    return spans


def read_group(run: Run, offsets: np.ndarray, group: int) -> dict:
    """Every row of cluster group ``group``, sorted by (cluster, pos): pos, shard, row, cluster, cos_dist, tie
    and the float32 embedding matrix. ``offsets``: first global row of each shard, by shard index.
    Memory: the group's matrix plus one shard's slice of it at a time."""
    spans = group_spans(run, group)
    if not spans:
        return {"pos": np.zeros(0, np.int64)}
    out, dtype = parts_dir(run), emb_dtype(run)
    meta = np.concatenate([_read(out / f"{name}.meta", META, lo, hi - lo) for _, name, lo, hi in spans])
    shard = np.repeat([i for i, *_ in spans], [hi - lo for *_, lo, hi in spans]).astype(np.int64)
    row = meta["row"].astype(np.int64)
    pos = offsets[shard] + row
    cluster = meta["cluster"].astype(np.int64)
    order = np.lexsort((pos, cluster))
    where = np.empty(len(order), dtype=np.int64)
    where[order] = np.arange(len(order))  # file row -> its place in the sorted group
    d = int(np.load(run.layout.centroids, mmap_mode="r").shape[1])
    matrix, start = np.empty((len(order), d), dtype=np.float32), 0
    for _, name, lo, hi in spans:
        matrix[where[start:start + hi - lo]] = _read(out / f"{name}.emb", dtype, lo * d, (hi - lo) * d).reshape(-1, d)
        start += hi - lo
    return {"pos": pos[order], "shard": shard[order], "row": row[order], "cluster": cluster[order],
            "cos_dist": meta["cos_dist"].astype(np.float64)[order], "tie": meta["tie"][order], "embedding": matrix}
