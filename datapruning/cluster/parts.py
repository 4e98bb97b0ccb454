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
from ..io.files import atomic_path, write_raw
from ..run import Run

META = np.dtype([("row", "<i4"), ("cluster", "<i4"), ("cos_dist", "<f4"), ("tie", "<u8")])  # 20 bytes, packed
INDEX = np.dtype("<i8")


def parts_dir(run: Run) -> Path:
    return run.layout.parts


def emb_dtype(run: Run) -> np.dtype:
    """The partitions keep the embed stage's storage precision."""
    return np.dtype("<f2") if run.cfg.embed.store_dtype == "float16" else np.dtype("<f4")


MERGE_BYTES = 32 << 20  # sorted rows moved per step when a shard's runs are merged


class PartsWriter:
    """Shard ``name``'s sorted copy, written from chunks of consecutive rows: ``add`` appends each chunk's rows
    sorted by cluster to a scratch file of runs; ``close`` merges the runs cluster by cluster into ``<shard>.emb``
    (rows sorted by (cluster, row)), then writes the meta and, last, the index, and returns the three files. Memory: a chunk or a merge
    step, never the shard's matrix."""

    def __init__(self, run: Run, name: str, k: int, runs: Path):
        self.run, self.name, self.k, self.runs = run, name, int(k), runs
        self.dtype, self.counts, self.d = emb_dtype(run), [], 0
        self.fh = open(runs, "wb")

    def add(self, matrix: np.ndarray, cluster: np.ndarray) -> None:
        order = np.argsort(cluster, kind="stable")
        np.ascontiguousarray(matrix[order], dtype=self.dtype).tofile(self.fh)
        self.counts.append(np.bincount(cluster, minlength=self.k))
        self.d = matrix.shape[1]

    def close(self, cluster: np.ndarray, cos_dist: np.ndarray, tie: np.ndarray, groups: np.ndarray) -> list[Path]:
        self.fh.close()
        order = np.lexsort((np.arange(len(cluster)), cluster))
        meta = np.empty(len(order), dtype=META)
        meta["row"], meta["cluster"] = order, cluster[order]
        meta["cos_dist"], meta["tie"] = cos_dist[order], tie[order]
        counts = np.bincount(groups[cluster[order]], minlength=int(groups.max()) + 1)
        out = parts_dir(self.run)
        with atomic_path(out / f"{self.name}.emb") as tmp, open(tmp, "wb") as dst, open(self.runs, "rb") as src:
            self._merge(src, dst)
        write_raw(out / f"{self.name}.meta", meta)
        write_raw(out / f"{self.name}.idx", np.r_[0, np.cumsum(counts)].astype(INDEX))
        return [out / f"{self.name}.{ext}" for ext in ("emb", "meta", "idx")]

    def _merge(self, src, dst) -> None:
        """The runs' rows in (cluster, run) order: clusters taken in batches of about ``MERGE_BYTES``, one read
        per run each; a cluster above that is copied run by run in pieces."""
        if not self.counts:
            return
        C = np.array(self.counts, dtype=np.int64)  # [runs, k]
        run_start = np.r_[0, np.cumsum(C.sum(axis=1))][:-1]
        at = run_start[:, None] + np.cumsum(C, axis=1) - C  # first row of cluster c in run i
        row_bytes = self.d * self.dtype.itemsize
        per_cluster = C.sum(axis=0)
        step = max(1, MERGE_BYTES // max(row_bytes, 1))
        c0 = 0
        while c0 < self.k:
            c1, total = c0 + 1, int(per_cluster[c0])
            while c1 < self.k and total + per_cluster[c1] <= step:
                total, c1 = total + int(per_cluster[c1]), c1 + 1
            if c1 - c0 == 1:
                for i in range(len(C)):
                    for s in range(0, int(C[i, c0]), step):
                        self._read(src, int(at[i, c0]) + s, min(step, int(C[i, c0]) - s)).tofile(dst)
            else:
                rows = np.concatenate([self._read(src, int(at[i, c0]), int(C[i, c0:c1].sum())) for i in range(len(C))])
                labels = np.concatenate([np.repeat(np.arange(c0, c1), C[i, c0:c1]) for i in range(len(C))])
                rows[np.argsort(labels, kind="stable")].tofile(dst)
            c0 = c1

    def _read(self, src, row: int, count: int) -> np.ndarray:
        src.seek(row * self.d * self.dtype.itemsize)
        return np.fromfile(src, dtype=self.dtype, count=count * self.d).reshape(count, self.d)


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


def group_rows(run: Run, n_groups: int) -> np.ndarray:
    """Rows of every group (int64 [n_groups]), from each shard's index (one read per shard)."""
    total = np.zeros(n_groups, dtype=np.int64)
    for shard in run.shards:
        total += np.diff(_read(parts_dir(run) / f"{shard['name']}.idx", INDEX, 0, n_groups + 1))
    return total


def group_meta(run: Run, offsets: np.ndarray, spans: list) -> dict:
    """The numeric columns of the rows in ``spans`` (``group_spans``), sorted by (cluster, pos): pos, shard, row,
    cluster, cos_dist, tie, and ``file``: each row's place in the spans' file order (for ``fetch_rows``)."""
    out = parts_dir(run)
    meta = np.concatenate([_read(out / f"{name}.meta", META, lo, hi - lo) for _, name, lo, hi in spans])
    shard = np.repeat([i for i, *_ in spans], [hi - lo for *_, lo, hi in spans]).astype(np.int64)
    row = meta["row"].astype(np.int64)
    pos = offsets[shard] + row
    cluster = meta["cluster"].astype(np.int64)
    order = np.lexsort((pos, cluster))
    return {"pos": pos[order], "shard": shard[order], "row": row[order], "cluster": cluster[order],
            "cos_dist": meta["cos_dist"].astype(np.float64)[order], "tie": meta["tie"][order], "file": order}


def embedding_dim(run: Run) -> int:
    return int(np.load(run.layout.centroids, mmap_mode="r").shape[1])


def span_chunks(run: Run, spans: list, rows: int):
    """The spans' embeddings as float32 chunks of at most ``rows`` rows, in file order (sequential reads)."""
    out, dtype, d = parts_dir(run), emb_dtype(run), embedding_dim(run)
    for _, name, lo, hi in spans:
        for s in range(lo, hi, rows):
            n = min(rows, hi - s)
            yield _read(out / f"{name}.emb", dtype, s * d, n * d).reshape(n, d).astype(np.float32, copy=False)


def fetch_rows(run: Run, spans: list, at: np.ndarray) -> np.ndarray:
    """The float32 embeddings at file positions ``at`` of the spans (any order), read through memory maps that
    are closed again before returning (memory: the rows asked for)."""
    out, dtype, d = parts_dir(run), emb_dtype(run), embedding_dim(run)
    at = np.asarray(at, dtype=np.int64)
    starts = np.cumsum([0] + [hi - lo for *_, lo, hi in spans])
    rows = np.empty((len(at), d), dtype=np.float32)
    span = np.searchsorted(starts, at, side="right") - 1
    for i in np.unique(span):
        _, name, lo, hi = spans[i]
        sel = np.flatnonzero(span == i)
        mm = np.memmap(out / f"{name}.emb", dtype=dtype, mode="r", offset=lo * d * dtype.itemsize, shape=(hi - lo, d))
        rows[sel] = mm[at[sel] - starts[i]]
        del mm
    return rows


def read_group(run: Run, offsets: np.ndarray, group: int) -> dict:
    """Every row of cluster group ``group``, sorted by (cluster, pos): pos, shard, row, cluster, cos_dist, tie
    and the float32 embedding matrix. ``offsets``: first global row of each shard, by shard index.
    Memory: the group's matrix plus one shard's slice of it at a time."""
    spans = group_spans(run, group)
    if not spans:
        return {"pos": np.zeros(0, np.int64)}
    block = group_meta(run, offsets, spans)
    where = np.empty(len(block["file"]), dtype=np.int64)
    where[block.pop("file")] = np.arange(len(where))  # file row -> its place in the sorted group
    out, dtype, d = parts_dir(run), emb_dtype(run), embedding_dim(run)
    matrix, start = np.empty((len(where), d), dtype=np.float32), 0
    for _, name, lo, hi in spans:
        matrix[where[start:start + hi - lo]] = _read(out / f"{name}.emb", dtype, lo * d, (hi - lo) * d).reshape(-1, d)
        start += hi - lo
    return {**block, "embedding": matrix}
