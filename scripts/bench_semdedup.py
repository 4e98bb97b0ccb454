"""Benchmark: our blocked SemDeDup scores against the SemDeDup paper's per-cluster dense algorithm (one full
similarity matrix per cluster, ``triu(diagonal=1).max(axis=0)``) on the same embeddings, clusters and keep
order. Both must give the same scores; prints seconds and peak extra memory of each, and the time ratio.

    python scripts/bench_semdedup.py                  # 1M x 512 in 500 clusters
    python scripts/bench_semdedup.py --quick          # tiny (CI)
    python scripts/bench_semdedup.py --big-cluster 40000   # one 40k-member cluster: dense needs 6 GiB there
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import make_centres, mib, mixture, report  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--big-cluster", type=int, default=0, help="also put this many rows in one cluster")
    p.add_argument("--block-rows", type=int, default=2048)
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.k, args.block_rows = 3000, 32, 8, 128
    return args


def make_data(n: int, d: int, k: int, big: int, seed: int = 0):
    """Embeddings, their cluster (the generating centre; ``big`` rows share cluster 0) and cos_dist to the
    normalised cluster mean, as the cluster stage would give them."""
    from scipy import sparse

    x, cluster = mixture(np.random.default_rng(seed), make_centres(k, d, seed), n, spread=0.04, dup_fraction=0.1)
    if big:
        cluster[:big] = 0
    onehot = sparse.csr_matrix((np.ones(n, np.float32), (cluster, np.arange(n))), shape=(k, n))
    centroids = np.asarray(onehot @ x, dtype=np.float32)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    cos_dist = 1.0 - np.einsum("ij,ij->i", x, centroids[cluster])
    return x, cluster.astype(np.int64), cos_dist.astype(np.float32)


def dense_semdedup(x: np.ndarray, cluster: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The paper's algorithm: per cluster, members in keep order, M = X X^T, column max of triu(M, 1)."""
    out = np.zeros(len(x), dtype=np.float64)
    order = order[np.argsort(cluster[order], kind="stable")]
    bounds = np.flatnonzero(np.diff(cluster[order])) + 1
    for rows in np.split(order, bounds):
        xc = x[rows]
        sims = np.triu(xc @ xc.T, k=1)
        out[rows] = sims.max(axis=0)
    return out


def measure(fn, *args):
    tracemalloc.start()
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def main(argv=None) -> dict:
    args = parse(argv)
    from datapruning.metrics.semdedup import semdedup_scores
    from datapruning.select import rank_order

    x, cluster, cos_dist = make_data(args.n, args.d, args.k, args.big_cluster)
    ours, ours_s, ours_peak = measure(semdedup_scores, x, cluster, cos_dist, "hard", 0, args.block_rows)
    order = rank_order(cos_dist.astype(np.float64), "hard", 0)
    dense, dense_s, dense_peak = measure(dense_semdedup, x, cluster, order)
    # the paper's triu leaves 0 where every earlier similarity is negative (and for the first member)
    max_diff = float(np.abs(np.maximum(ours, 0.0) - dense).max())
    sizes = np.bincount(cluster)
    result = {
        "n": args.n, "d": args.d, "k": args.k, "largest_cluster": int(sizes.max()), "block_rows": args.block_rows,
        "embedding_mib": mib(x.nbytes), "ours_s": round(ours_s, 3), "dense_s": round(dense_s, 3),
        "ratio": round(ours_s / dense_s, 3), "ours_peak_extra_mib": mib(ours_peak),
        "dense_peak_extra_mib": mib(dense_peak), "max_abs_diff": max_diff, "same_scores": max_diff < 1e-5,
        "removed_at_eps_0.01": int((ours > 0.99).sum()), "quick": args.quick,
    }
    print(f"semdedup: ours {ours_s:.2f}s (+{mib(ours_peak)} MiB) vs dense {dense_s:.2f}s (+{mib(dense_peak)} MiB): "
          f"{ours_s / dense_s:.2f}x; scores agree to {max_diff:.1e}", file=sys.stderr)
    report("bench_semdedup", result, args.json)
    return result


if __name__ == "__main__":
    main()
