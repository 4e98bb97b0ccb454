"""Cluster stage: fit spherical k-means on a sample, assign every shard, write rows grouped by cluster.

Each shard gets cluster, cos_dist and the seeded tie key, and its rows are written again grouped by cluster
(clusters/parts/: a sorted copy with per-group offsets), so per-cluster work reads only its clusters.
See docs/methods.md#clustering-spherical-k-means.
"""
from __future__ import annotations

import itertools
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from .kmeans import CHUNK_BYTES, assign, check_k, fit_kmeans, resolve_backend, sample_size
from .kmeans_stream import chunks, stream_kmeans
from .parts import write_parts
from .unique import check_unique_uids, write_ties
from ..io.files import atomic_path, check_any_rows, is_done, mark_done, vouch, write_json, write_npy, write_parquet
from ..io.tables import column_to_matrix, read_stage
from ..cutoffs import Cutoffs, find_cutoffs
from ..hashing import uid_hash
from ..rows import BlockRows
from ..run import Rate, Run, log, prepare_stage, progress, shard_offsets, shard_rows, timed

READ_THREADS = min(8, os.cpu_count() or 1)  # parquet shards decoded at once (decoding releases the GIL)
PREFETCH_BYTES = 512 << 20  # decoded shards held ahead of the assignment


def read_matrix(run: Run, shard: str) -> np.ndarray:
    """One shard's float32 [n, d] embedding matrix (only that column is read)."""
    table = read_stage(run.layout.shard_file("embed", shard), columns=["embedding"])
    return column_to_matrix(table["embedding"], f"embeddings/{shard}.parquet")


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
    """One shard's sample rows (float32 [m, d]) and their (hash, row) keys ([m, 2] uint64)."""
    shard, offset, n = item
    table, matrix = read_uid_matrix(run, shard["name"])
    keys = by_hash({"pos": np.arange(offset, offset + n, dtype=np.int64), "tie": uid_hash(table["uid"], run.cfg.seed)})
    keep = cut.keep(*keys)
    return matrix[keep], np.stack([keys[1][keep], keys[3][keep]], axis=1)


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


def read_uid_matrix(run: Run, shard: str) -> tuple[pa.Table, np.ndarray]:
    """One shard's uid and embedding columns (as stored) and its float32 [n, d] matrix."""
    table = read_stage(run.layout.shard_file("embed", shard), columns=["uid", "embedding"])
    return table, column_to_matrix(table["embedding"], f"embeddings/{shard}.parquet")


def assign_shard(run: Run, shard: dict, centroids: np.ndarray, groups, table: pa.Table, matrix: np.ndarray,
                 start: float) -> dict:
    """Assign one shard's rows to the centroids; write its cluster parquet, its partition files, then the
    done marker."""
    cfg, out_dir = run.cfg, run.dir("cluster")
    cluster, cos_dist = assign(matrix, centroids, cfg.cluster.assign_batch, resolve_backend(cfg.cluster.backend))
    tie = uid_hash(table["uid"], cfg.seed)
    files = [write_ties(run, shard["name"], tie)]
    if groups is not None:
        files += write_parts(run, shard["name"], matrix, cluster, cos_dist, tie, groups)
    files.append(run.layout.shard_file("cluster", shard["name"]))
    write_parquet(files[-1], pa.table({"uid": table["uid"], "cluster": pa.array(cluster, pa.int32()),
                                       "cos_dist": cos_dist, "tie": pa.array(tie)}))
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
    table, matrix = read_uid_matrix(run, shard["name"])
    return assign_shard(run, shard, centroids, groups, table, matrix, start)


def assign_prefetching(run: Run, todo: list[tuple[dict, int]], out_dir: Path) -> Iterator[dict]:
    """``assign_one`` over ``todo`` (shard, rows) in this process, decoding the next shards on threads while
    this one is assigned; at most ``PREFETCH_BYTES`` of decoded shards wait."""
    centroids, groups = load_fit(run)
    largest = max((rows for _, rows in todo), default=1) * centroids.shape[1] * 4
    depth = max(1, min(READ_THREADS, PREFETCH_BYTES // max(largest, 1)))
    with ThreadPoolExecutor(depth) as pool:
        ahead = deque(pool.submit(read_uid_matrix, run, s["name"]) for s, _ in todo[:depth])
        for i, (shard, _) in enumerate(todo):
            start = time.perf_counter()
            table, matrix = ahead.popleft().result()
            if i + depth < len(todo):
                ahead.append(pool.submit(read_uid_matrix, run, todo[i + depth][0]["name"]))
            yield assign_shard(run, shard, centroids, groups, table, matrix, start)


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
