"""Cluster stage: fit spherical k-means on a sample, assign every shard, write rows grouped by cluster.

Each shard gets cluster, cos_dist and the seeded tie key, and its rows are written again grouped by cluster
(clusters/parts/), so per-cluster work reads only its clusters. See docs/methods.md#clustering-spherical-k-means.
"""
from __future__ import annotations

import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from .kmeans import assign, fit_kmeans, resolve_backend, sample_indices
from ..errors import StageError
from ..io.files import check_any_rows, is_done, mark_done, write_json, write_npy, write_parquet
from ..io.tables import column_to_matrix, read_stage
from ..exec import call, map_unordered
from ..metrics.random import uid_hash
from ..rows import add, concat
from ..run import Rate, Run, log, prepare_stage, progress, run_rows, shard_rows, timed

READ_THREADS = min(8, os.cpu_count() or 1)  # parquet shards decoded at once (decoding releases the GIL)
PREFETCH_BYTES = 512 << 20  # decoded shards held ahead of the assignment


def read_embeddings(run: Run, shard: str) -> tuple[pa.Table, np.ndarray]:
    """One shard's embedding table (without the vectors) and its float32 [n, d] matrix."""
    table = read_stage(run.dir("embed") / f"{shard}.parquet")
    matrix = column_to_matrix(table["embedding"], f"embeddings/{shard}.parquet")
    return table.drop_columns(["embedding"]), matrix


def read_matrix(run: Run, shard: str) -> np.ndarray:
    """One shard's float32 [n, d] embedding matrix (only that column is read)."""
    table = read_stage(run.dir("embed") / f"{shard}.parquet", columns=["embedding"])
    return column_to_matrix(table["embedding"], f"embeddings/{shard}.parquet")


def gather_rows(run: Run, counts: list[tuple[dict, int]], rows: np.ndarray) -> np.ndarray:
    """The embeddings at global row indices ``rows`` (sorted), read shard by shard into one array.
    Shards are decoded on a few threads (parquet decoding releases the GIL); each keeps only its rows."""
    wanted, offset = [], 0
    for shard, n in counts:
        local = rows[(rows >= offset) & (rows < offset + n)] - offset
        if len(local):
            wanted.append((shard["name"], local))
        offset += n
    out, filled = None, 0
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for block in pool.map(lambda item: read_matrix(run, item[0])[item[1]], wanted):
            if out is None:
                out = np.empty((len(rows), block.shape[1]), dtype=np.float32)
            out[filled:filled + len(block)] = block
            filled += len(block)
    return out


def fit_sample(cfg, output: Path, counts: list[tuple[dict, int]], idx: np.ndarray):
    """Gather the fit sample from the run folder and fit k-means on it (locally or on a Ray worker).
    Returns (centroids, stats, the sample's size per cluster)."""
    start = time.perf_counter()
    ccfg = cfg.cluster
    x = gather_rows(Run(cfg, Path(output)), counts, idx)
    backend = resolve_backend(cfg.cluster.backend)
    centroids, stats = fit_kmeans(x, ccfg.k, ccfg.niter, cfg.seed, backend)
    sample_sizes = np.bincount(assign(x, centroids, ccfg.assign_batch, backend)[0], minlength=ccfg.k)
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
    table = read_stage(run.dir("embed") / f"{shard}.parquet", columns=["uid", "embedding"])
    return table, column_to_matrix(table["embedding"], f"embeddings/{shard}.parquet")


def write_partition(run: Run, shard: dict, table: pa.Table, cluster: np.ndarray, cos_dist, tie, groups) -> int:
    """The shard's rows again, one file per group of clusters (parts/g<group>/<shard>.parquet), each sorted
    by (cluster, row): shard index, row, cluster, cos_dist, tie and the embedding as stored."""
    order = np.lexsort((np.arange(len(cluster)), cluster))
    group = groups[cluster[order]]
    bounds = np.flatnonzero(np.diff(group)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
        if hi > lo:
            rows = order[lo:hi]
            part = pa.table({"shard": pa.array(np.full(hi - lo, shard["index"], np.int32)),
                             "row": pa.array(rows.astype(np.int32)), "cluster": pa.array(cluster[rows], pa.int32()),
                             "cos_dist": pa.array(cos_dist[rows]), "tie": pa.array(tie[rows]),
                             "embedding": table["embedding"].take(pa.array(rows))})
            write_parquet(run.partition_file(int(group[lo]), shard["name"]), part)
    return len(bounds) + 1 if len(order) else 0


def assign_shard(run: Run, shard: dict, centroids: np.ndarray, groups, table: pa.Table, matrix: np.ndarray,
                 start: float) -> dict:
    """Assign one shard's rows to the centroids; write its cluster parquet, its partition files, then the
    done marker."""
    cfg, out_dir = run.cfg, run.dir("cluster")
    cluster, cos_dist = assign(matrix, centroids, cfg.cluster.assign_batch, resolve_backend(cfg.cluster.backend))
    tie = uid_hash(table["uid"], cfg.seed)
    if groups is not None:
        write_partition(run, shard, table, cluster, cos_dist, tie, groups)
    write_parquet(out_dir / f"{shard['name']}.parquet",
                  pa.table({"uid": table["uid"], "cluster": pa.array(cluster, pa.int32()), "cos_dist": cos_dist,
                            "tie": pa.array(tie)}))
    info = {"rows": len(cluster), "seconds": round(time.perf_counter() - start, 3)}
    mark_done(out_dir, shard["name"], info)
    return info


def load_fit(run: Run) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored centroids and cluster -> group map (None when partitions are off)."""
    out_dir = run.dir("cluster")
    groups = out_dir / "groups.npy"
    return (np.load(out_dir / "centroids.npy", allow_pickle=False),
            np.load(groups, allow_pickle=False) if run.cfg.cluster.partition else None)


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


TIE_BITS = 20  # bucket the tie hashes by their top bits; one pass collects buckets of at most UNIQUE_BATCH rows
UNIQUE_BATCH = 2_000_000  # tie hashes gathered per pass (16 MB): memory flat in N, N / 2M passes


def _tie_hist(block: dict) -> np.ndarray:
    return np.bincount((block["tie"] >> np.uint64(64 - TIE_BITS)).astype(np.int64), minlength=1 << TIE_BITS)


def _ties_in(lo: int, hi: int, block: dict) -> tuple:
    bucket = (block["tie"] >> np.uint64(64 - TIE_BITS)).astype(np.int64)
    return (block["tie"][(bucket >= lo) & (bucket < hi)],)


def _uids_with(ties: np.ndarray, block: dict) -> list:
    return block["uid"].filter(pa.array(np.isin(block["tie"], ties))).to_pylist()


def check_unique_uids(run: Run) -> None:
    """Stop when a uid repeats across shards (each shard's own repeats were dropped by the embed stage).
    Equal uids have equal tie hashes: bucket the hashes, collect at most ``UNIQUE_BATCH`` at a time, and
    confirm any repeated hash on the uid strings themselves (a hash collision is not a duplicate)."""
    rows = run_rows(run)
    hist = rows.reduce(_tie_hist, add)
    if hist is None:
        return
    repeated, lo, cum = [], 0, np.cumsum(hist)
    while lo < len(hist):
        base = cum[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, base + UNIQUE_BATCH, side="right")))
        if cum[min(hi, len(hist)) - 1] - base > 1:
            ties = np.sort(rows.reduce(partial(_ties_in, lo, hi), concat)[0])
            repeated.append(np.unique(ties[1:][ties[1:] == ties[:-1]]))
        lo = hi
    repeated = np.concatenate(repeated) if repeated else np.zeros(0, np.uint64)
    if len(repeated):
        uids = run_rows(run, uid=True).reduce(partial(_uids_with, repeated), lambda parts: sum(parts, []))
        dup = sorted(u for u, c in Counter(uids).items() if c > 1)
        if dup:
            raise StageError(f"duplicate uid across shards: {dup[0]} (and {len(dup) - 1} more); "
                             "uids must be unique; fix the id column")


def run_cluster(run: Run) -> None:
    ccfg = run.cfg.cluster
    counts = shard_rows(run)
    check_any_rows(run.dir("embed"), [s["name"] for s, _ in counts])  # else "k larger than the 0 samples"
    out_dir = prepare_stage(run, "cluster")
    n = sum(c for _, c in counts)
    with timed(run, "cluster"):
        if not (out_dir / "fit.json").exists():
            idx = sample_indices(n, ccfg.k, ccfg.fit_fraction, ccfg.max_points_per_centroid, run.cfg.seed)
            log.info("cluster: fitting k=%d on %d of %d samples", ccfg.k, len(idx), n)
            resources = fit_resources(run.cfg)
            centroids, stats, sample_sizes = call(fit_sample, (run.cfg, run.output, counts, idx), run.cfg, resources)
            if resources:
                stats["ray"] = resources
            groups = plan_groups(sample_sizes, n, centroids.shape[1], ccfg.partition_mib)
            stats["groups"] = int(groups.max()) + 1
            write_npy(out_dir / "centroids.npy", centroids)
            write_npy(out_dir / "groups.npy", groups)
            write_json(out_dir / "fit.json", stats)  # written last: the fit's done marker
        todo = [({**s, "index": i}, rows) for i, (s, rows) in enumerate(counts) if not is_done(out_dir, s["name"])]
        with progress(len(todo), "cluster") as bar:
            rate = Rate()
            if run.cfg.backend == "local" and (run.cfg.workers <= 1 or len(todo) == 1):
                infos = assign_prefetching(run, todo, out_dir)
            else:
                infos = map_unordered(partial(assign_one, run), [s for s, _ in todo], run.cfg)
            for info in infos:
                rate.add(bar, info["rows"])
        if not (out_dir / "_unique.json").exists():  # checked once, after every shard is assigned
            check_unique_uids(run)
            write_json(out_dir / "_unique.json", {"unique_uids": True})
