"""Cluster stage: fit spherical k-means on a uniform sample, then assign every shard (cluster, cos_dist)."""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from .kmeans import assign, fit_kmeans, resolve_backend, sample_indices
from ..io.files import is_done, mark_done, write_json, write_npy, write_parquet
from ..io.tables import column_to_matrix, read_stage
from ..exec import call, map_unordered
from ..run import Rate, Run, log, prepare_stage, progress, shard_rows, timed

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


def fit_sample(cfg, output: Path, counts: list[tuple[dict, int]], idx: np.ndarray) -> tuple[np.ndarray, dict]:
    """Gather the fit sample from the run folder and fit k-means on it (locally or on a Ray worker)."""
    start = time.perf_counter()
    ccfg = cfg.cluster
    x = gather_rows(Run(cfg, Path(output)), counts, idx)
    centroids, stats = fit_kmeans(x, ccfg.k, ccfg.niter, cfg.seed, resolve_backend(cfg.cluster.backend))
    stats["seconds"] = round(time.perf_counter() - start, 3)
    return centroids, stats


def fit_resources(cfg) -> dict | None:
    """On Ray the fit runs as one task: on a GPU when the cluster has one (and cluster.backend is not
    faiss), else on a whole CPU node. None locally."""
    if cfg.backend != "ray":
        return None
    from ..exec.ray import cluster_gpus, largest_node_cpus

    if cluster_gpus(cfg) > 0 and cfg.cluster.backend != "faiss":
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": largest_node_cpus(cfg)}


def read_uid_matrix(run: Run, shard: str) -> tuple[pa.Array, np.ndarray]:
    """One shard's uids and float32 [n, d] embeddings (only those two columns are read)."""
    table = read_stage(run.dir("embed") / f"{shard}.parquet", columns=["uid", "embedding"])
    return table["uid"], column_to_matrix(table["embedding"], f"embeddings/{shard}.parquet")


def assign_shard(cfg, shard: dict, out_dir: Path, centroids: np.ndarray, uid, matrix: np.ndarray, start: float) -> dict:
    """Assign one shard's rows to the centroids and write its cluster parquet and done marker."""
    cluster, cos_dist = assign(matrix, centroids, cfg.cluster.assign_batch, resolve_backend(cfg.cluster.backend))
    write_parquet(out_dir / f"{shard['name']}.parquet",
                  pa.table({"uid": uid, "cluster": pa.array(cluster, pa.int32()), "cos_dist": cos_dist}))
    info = {"rows": len(cluster), "seconds": round(time.perf_counter() - start, 3)}
    mark_done(out_dir, shard["name"], info)
    return info


def assign_one(cfg, out_dir: Path, shard: dict) -> dict:
    """Assign one shard's samples to the stored centroids (the per-shard unit of work)."""
    start = time.perf_counter()
    centroids = np.load(out_dir / "centroids.npy", allow_pickle=False)
    uid, matrix = read_uid_matrix(Run(cfg, out_dir.parent), shard["name"])
    return assign_shard(cfg, shard, out_dir, centroids, uid, matrix, start)


def assign_prefetching(run: Run, todo: list[tuple[dict, int]], out_dir: Path) -> Iterator[dict]:
    """``assign_one`` over ``todo`` (shard, rows) in this process, decoding the next shards on threads while
    this one is assigned; at most ``PREFETCH_BYTES`` of decoded shards wait."""
    centroids = np.load(out_dir / "centroids.npy", allow_pickle=False)
    largest = max((rows for _, rows in todo), default=1) * centroids.shape[1] * 4
    depth = max(1, min(READ_THREADS, PREFETCH_BYTES // max(largest, 1)))
    with ThreadPoolExecutor(depth) as pool:
        ahead = deque(pool.submit(read_uid_matrix, run, s["name"]) for s, _ in todo[:depth])
        for i, (shard, _) in enumerate(todo):
            start = time.perf_counter()
            uid, matrix = ahead.popleft().result()
            if i + depth < len(todo):
                ahead.append(pool.submit(read_uid_matrix, run, todo[i + depth][0]["name"]))
            yield assign_shard(run.cfg, shard, out_dir, centroids, uid, matrix, start)


def run_cluster(run: Run) -> None:
    ccfg = run.cfg.cluster
    counts = shard_rows(run)
    out_dir = prepare_stage(run, "cluster")
    n = sum(c for _, c in counts)
    with timed(run, "cluster"):
        if not (out_dir / "fit.json").exists():
            idx = sample_indices(n, ccfg.k, ccfg.fit_fraction, ccfg.max_points_per_centroid, run.cfg.seed)
            log.info("cluster: fitting k=%d on %d of %d samples", ccfg.k, len(idx), n)
            resources = fit_resources(run.cfg)
            centroids, stats = call(fit_sample, (run.cfg, run.output, counts, idx), run.cfg, resources)
            if resources:
                stats["ray"] = resources
            write_npy(out_dir / "centroids.npy", centroids)
            write_json(out_dir / "fit.json", stats)  # written last: the fit's done marker
        todo = [(s, rows) for s, rows in counts if not is_done(out_dir, s["name"])]
        with progress(len(todo), "cluster") as bar:
            rate = Rate()
            if run.cfg.backend == "local" and (run.cfg.workers <= 1 or len(todo) == 1):
                infos = assign_prefetching(run, todo, out_dir)
            else:
                infos = map_unordered(partial(assign_one, run.cfg, out_dir), [s for s, _ in todo], run.cfg)
            for info in infos:
                rate.add(bar, info["rows"])
