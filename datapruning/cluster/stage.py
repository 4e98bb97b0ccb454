"""Cluster stage: fit spherical k-means on a sample, assign every shard, write rows grouped by cluster.

Each shard gets cluster, cos_dist and the seeded tie key, and its rows are written again grouped by cluster
(clusters/parts/: a sorted copy with per-group offsets), so per-cluster work reads only its clusters.
See docs/methods.md#clustering-spherical-k-means.
"""
from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .kmeans import CHUNK_BYTES, assign, check_k, fit_kmeans, resolve_backend, sample_size
from .kmeans_stream import chunks, stream_kmeans
from .parts import PartsWriter, parts_dir
from .unique import check_unique_uids, write_ties
from ..io.files import (atomic_path, check_any_rows, is_done, mark_done, scratch_path, vouch, write_json, write_npy,
                        write_parquet)
from ..io.tables import column_to_matrix, read_ahead, read_batches, read_stage
from ..cutoffs import Cutoffs, find_cutoffs
from ..hashing import uid_hash
from ..rows import BlockRows
from ..run import Rate, Run, log, prepare_stage, progress, shard_offsets, shard_rows, timed

READ_THREADS = min(8, os.cpu_count() or 1)  # shards decoded at once while gathering the fit sample
SHARD_CHUNK_BYTES = 32 << 20  # float32 rows of a shard read, assigned and written per step
PREFETCH_CHUNKS = 2  # decoded chunks waiting while one is assigned


def shard_chunks(run: Run, shard: str, d: int | None = None) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """One shard's (uid table, float32 [m, d] matrix) in chunks of consecutive rows of about ``SHARD_CHUNK_BYTES``
    (``d``: the embedding width when known): memory follows the chunk, not the shard or its row groups."""
    path = run.layout.shard_file("embed", shard)
    if d is None:
        kind = pq.read_schema(path).field("embedding").type
        d = kind.list_size if pa.types.is_fixed_size_list(kind) else 1024
    for table in read_batches(path, ["uid", "embedding"], max(1, SHARD_CHUNK_BYTES // (4 * d))):
        yield table, column_to_matrix(table["embedding"], f"embeddings/{shard}.parquet")


def hash_block(run: Run, item: tuple) -> dict:
    """One shard's global row numbers and seeded uid hashes (only the uid column is read)."""
    shard, offset, n = item
    uid = read_stage(run.layout.shard_file("embed", shard["name"]), columns=["uid"])["uid"]
    return {"pos": np.arange(offset, offset + n, dtype=np.int64), "tie": uid_hash(uid, run.cfg.seed)}


def by_hash(block: dict) -> tuple:
    """``find_cutoffs`` keys ranking every row by its seeded uid hash (the row only breaks an exact collision)."""
    zero = np.zeros(len(block["tie"]), np.uint64)
    return np.zeros(len(zero), np.int64), block["tie"], zero, block["pos"].astype(np.uint64)


def sample_cut(run: Run, items: list[tuple], size: int) -> Cutoffs:
    """The fit sample: the ``size`` rows with the smallest seeded uid hashes, so it depends on the rows alone,
    not on shard names, shard count or row order (a few passes over the uid column)."""
    n = sum(rows for _, _, rows in items)
    return find_cutoffs(BlockRows(partial(hash_block, run), items, n, run.executor), by_hash, np.array([size]),
                        np.array([n]))


def sample_part(run: Run, cut: Cutoffs, item: tuple) -> tuple[np.ndarray, np.ndarray]:
    """One shard's sample rows (float32 [m, d]) and their (hash, row) keys ([m, 2] uint64), read chunk by chunk."""
    shard, offset, _ = item
    rows, keys = [np.zeros((0, 0), np.float32)], [np.zeros((0, 2), np.uint64)]
    for table, matrix in shard_chunks(run, shard["name"]):
        key = by_hash({"pos": np.arange(offset, offset + len(matrix), dtype=np.int64),
                       "tie": uid_hash(table["uid"], run.cfg.seed)})
        keep = cut.keep(*key)
        rows.append(matrix[keep])
        keys.append(np.stack([key[1][keep], key[3][keep]], axis=1))
        offset += len(matrix)
    return (np.concatenate(rows[1:]) if len(rows) > 1 else rows[0]), np.concatenate(keys)


def sample_blocks(run: Run, items: list[tuple], cut: Cutoffs) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``sample_part`` of every shard with sample rows, in shard order, decoded on a few threads (parquet
    releases the GIL)."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        yield from (part for part in pool.map(partial(sample_part, run, cut), items) if len(part[0]))


def first_by_hash(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` rows with the smallest (hash, row) keys: the initial centroids."""
    return np.lexsort((keys[:, 1], keys[:, 0]))[:k]


def fit_sample(cfg, output: Path, items: list[tuple], cut: Cutoffs, size: int):
    """Gather the fit sample from the run folder and fit k-means on it (locally or on a Ray worker): in memory
    up to ``cluster.fit_mib``, else from a copy on disk (``kmeans_stream``). The centroids start from the rows
    with the smallest uid hashes. Returns (centroids, stats, the sample's size per cluster)."""
    start = time.perf_counter()
    ccfg, run = cfg.cluster, Run(cfg, Path(output))
    backend = resolve_backend(ccfg.backend)
    blocks = sample_blocks(run, items, cut)
    first = next(blocks)
    blocks, d = itertools.chain([first], blocks), first[0].shape[1]
    if size * d * 4 <= ccfg.fit_mib << 20:
        parts = list(blocks)
        x = np.concatenate([b for b, _ in parts])
        keys = np.concatenate([k for _, k in parts])
        centroids, stats = fit_kmeans(x, ccfg.k, ccfg.niter, cfg.seed, backend, init=first_by_hash(keys, ccfg.k))
        sample_sizes = np.bincount(assign(x, centroids, ccfg.assign_batch, backend, exact=False)[0], minlength=ccfg.k)
    else:
        path = run.layout.fit_sample
        keys = []
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            for block, key in blocks:
                np.ascontiguousarray(block, dtype=np.float32).tofile(fh)
                keys.append(key)
        keys = np.concatenate(keys)
        centroids, stats = stream_kmeans(path, len(keys), d, ccfg.k, ccfg.niter, cfg.seed, backend, ccfg.assign_batch,
                                         init=first_by_hash(keys, ccfg.k))
        sample_sizes = np.zeros(ccfg.k, np.int64)
        for x in chunks(path, len(keys), d, max(1, CHUNK_BYTES // (4 * d))):
            sample_sizes += np.bincount(assign(x, centroids, ccfg.assign_batch, backend, exact=False)[0],
                                        minlength=ccfg.k)
        path.unlink()
    stats["seconds"] = round(time.perf_counter() - start, 3)
    return centroids, stats, sample_sizes


def plan_groups(sample_sizes: np.ndarray, n: int, d: int, partition_mib: int) -> np.ndarray:
    """Cluster -> group id: consecutive clusters packed while their estimated rows (the fit sample's counts
    scaled to ``n``) fit ``partition_mib`` of float32 embeddings; a larger cluster is a group alone."""
    est = np.asarray(sample_sizes, dtype=np.float64) * n / max(int(np.sum(sample_sizes)), 1)
    budget = max(1.0, partition_mib * 2.0**20 / (4 * max(d, 1)))
    group = np.empty(len(est), dtype=np.int32)
    g, filled = 0, 0.0
    for c, rows in enumerate(est):
        if filled and filled + rows > budget:
            g, filled = g + 1, 0.0
        group[c], filled = g, filled + rows
    return group


def fit_resources(cfg) -> dict | None:
    """On Ray the fit runs as one task: on a GPU when the cluster has one (and cluster.backend is not
    faiss), else on a whole CPU node. None locally."""
    if cfg.backend != "ray":
        return None
    from ..exec.ray import cluster_gpus, largest_node_cpus

    if cluster_gpus(cfg) > 0 and cfg.cluster.backend != "faiss":
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": largest_node_cpus(cfg)}


def assign_shard(run: Run, shard: dict, centroids: np.ndarray, groups, chunks, start: float) -> dict:
    """Assign one shard's rows, chunk by chunk (``chunks``: its (uid table, matrix) pieces in row order), to the
    centroids; write its cluster parquet, its partition files, then the done marker."""
    cfg, out_dir = run.cfg, run.dir("cluster")
    backend = resolve_backend(cfg.cluster.backend)
    uids, cols = [], {"cluster": [np.zeros(0, np.int64)], "cos_dist": [np.zeros(0, np.float32)],
                      "tie": [np.zeros(0, np.uint64)]}
    with scratch_path(parts_dir(run) / f"{shard['name']}.runs") as runs:
        writer = PartsWriter(run, shard["name"], len(centroids), runs) if groups is not None else None
        for table, matrix in chunks:
            cluster, cos_dist = assign(matrix, centroids, cfg.cluster.assign_batch, backend)
            if writer is not None:
                writer.add(matrix, cluster)
            uids.append(table["uid"])
            for key, value in zip(cols, (cluster, cos_dist, uid_hash(table["uid"], cfg.seed))):
                cols[key].append(value)
        cluster, cos_dist, tie = (np.concatenate(v) for v in cols.values())
        files = [write_ties(run, shard["name"], tie)]
        if writer is not None:
            files += writer.close(cluster, cos_dist, tie, groups)
    # one array, so the file's bytes do not depend on the chunk size
    uid = pa.concat_arrays([c for t in uids for c in t.chunks]) if uids else pa.array([], pa.string())
    files.append(run.layout.shard_file("cluster", shard["name"]))
    write_parquet(files[-1], pa.table({"uid": uid, "cluster": pa.array(cluster, pa.int32()), "cos_dist": cos_dist,
                                       "tie": pa.array(tie)}))
    info = {"rows": len(cluster), "seconds": round(time.perf_counter() - start, 3)}
    mark_done(out_dir, shard["name"], info, files=files)
    return info


def load_fit(run: Run) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored centroids and cluster -> group map (None when partitions are off)."""
    layout = run.layout
    return (np.load(layout.centroids, allow_pickle=False),
            np.load(layout.groups, allow_pickle=False) if run.cfg.cluster.partition else None)


def assign_one(run: Run, shard: dict) -> dict:
    """Assign one shard's samples to the stored centroids (the per-shard unit of work)."""
    start = time.perf_counter()
    centroids, groups = load_fit(run)
    return assign_shard(run, shard, centroids, groups, shard_chunks(run, shard["name"], centroids.shape[1]), start)


def assign_prefetching(run: Run, todo: list[tuple[dict, int]], out_dir: Path) -> Iterator[dict]:
    """``assign_one`` over ``todo`` (shard, rows) in this process, the next chunks (of this shard or the next
    ones) decoded on a thread while one is assigned: at most ``PREFETCH_CHUNKS`` wait."""
    centroids, groups = load_fit(run)
    d = centroids.shape[1]

    def pieces():
        for shard, _ in todo:
            for chunk in shard_chunks(run, shard["name"], d):
                yield shard["name"], chunk
            yield shard["name"], None  # the shard's end (an empty shard has only this)

    by_name = {s["name"]: s for s, _ in todo}
    for name, group in itertools.groupby(read_ahead(pieces(), PREFETCH_CHUNKS), key=lambda item: item[0]):
        shard = by_name[name]
        yield assign_shard(run, shard, centroids, groups, (c for _, c in group if c is not None), time.perf_counter())


def run_cluster(run: Run) -> None:
    ccfg = run.cfg.cluster
    counts = shard_rows(run)
    check_any_rows(run.dir("embed"), [s["name"] for s, _ in counts])  # else "k larger than the 0 samples"
    n = sum(c for _, c in counts)
    check_k(ccfg.k, n)  # before prepare_stage clears the outputs of the last config
    out_dir, layout = prepare_stage(run, "cluster"), run.layout
    with timed(run, "cluster"):
        if not layout.fit_info.exists():
            size = sample_size(n, ccfg.k, ccfg.fit_fraction, ccfg.max_points_per_centroid)
            log.info("cluster: fitting k=%d on %d of %d samples", ccfg.k, size, n)
            items = shard_offsets(run)
            cut = sample_cut(run, items, size)
            resources = fit_resources(run.cfg)
            centroids, stats, sample_sizes = run.executor.call(fit_sample, (run.cfg, run.output, items, cut, size),
                                                               resources)
            if resources:
                stats["ray"] = resources
            groups = plan_groups(sample_sizes, n, centroids.shape[1], ccfg.partition_mib)
            stats["groups"] = int(groups.max()) + 1
            write_npy(layout.centroids, centroids)
            write_npy(layout.groups, groups)
            stats["files"] = vouch(run.output, [layout.centroids, layout.groups])
            write_json(layout.fit_info, stats)  # written last: the fit's done marker
        todo = [({**s, "index": i}, rows) for i, (s, rows) in enumerate(counts) if not is_done(out_dir, s["name"])]
        with progress(len(todo), "cluster") as bar:
            rate = Rate()
            if run.executor.in_process or len(todo) == 1:
                infos = assign_prefetching(run, todo, out_dir)
            else:
                infos = run.executor.map_unordered(partial(assign_one, run), [s for s, _ in todo])
            for info in infos:
                rate.add(bar, info["rows"])
        if not layout.unique.exists():  # checked once, after every shard is assigned
            check_unique_uids(run, n)
            write_json(layout.unique, {"unique_uids": True})
    write_json(run.info_path("cluster"), {"rows": n, "shards": len(counts)})  # written last: the stage is done
