"""Benchmark: our cluster stage (fit on the sample + streaming assignment, parquet in and out) against a bare
script that loads the same parquet into one matrix and runs ``faiss.Kmeans`` + ``index.search`` with the same
k, niter and sample. Target <= 1.3x. The compute-only ratio (bare without its load) is printed too.

    python scripts/bench_cluster.py                 # 1M x 512, k=500 (the SemDeDup+DBP recipe's k)
    python scripts/bench_cluster.py --quick         # tiny, seconds (CI)
    python scripts/bench_cluster.py --backend torch # our torch k-means (CUDA when present) vs bare faiss
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import mib, read_matrix, report, scratch, write_embedding_shards  # noqa: E402

TARGET = 1.3


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--backend", default="auto", help="cluster.backend: auto | faiss | faiss-gpu | torch")
    p.add_argument("--workdir", help="folder for the data and the run (default: a temporary folder)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.k, args.niter, args.shards = 3000, 32, 12, 5, 3
    return args


def bare_faiss(x: np.ndarray, idx: np.ndarray, k: int, niter: int, seed: int, gpu: bool) -> tuple[np.ndarray, float]:
    """The baseline: plain faiss on the same sample, then one search over every row."""
    import faiss

    start = time.perf_counter()
    sample = x[idx]
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, gpu=gpu,
                      max_points_per_centroid=-(-len(sample) // k), verbose=False)
    km.train(sample)
    _, labels = km.index.search(x, 1)
    return labels[:, 0], time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse(argv)
    from datapruning.cluster import resolve_backend, sample_indices
    from datapruning.config import load_config
    from datapruning.runner import run_stage

    with scratch(args.workdir, "bench_cluster_") as work:
        t0 = time.perf_counter()
        paths = write_embedding_shards(work / "input", args.n, args.d, args.shards, k_true=max(2, args.k), seed=0)
        gen_s = time.perf_counter() - t0
        cfg = load_config(None, ["embed.encoder=precomputed", f"cluster.k={args.k}", f"cluster.niter={args.niter}",
                                 f"cluster.backend={args.backend}", "seed=0"])
        run_stage("embed", cfg, work / "run", str(work / "input"))  # ingest, not timed
        backend = resolve_backend(args.backend)
        start = time.perf_counter()
        run_stage("cluster", cfg, work / "run")
        ours_s = time.perf_counter() - start

        import pyarrow.parquet as pq

        start = time.perf_counter()
        x = read_matrix(paths)  # a bare script loads its embeddings too
        load_s = time.perf_counter() - start
        idx = sample_indices(len(x), args.k, None, cfg.cluster.max_points_per_centroid, cfg.seed)
        labels, compute_s = bare_faiss(x, idx, args.k, args.niter, cfg.seed, gpu=backend == "faiss-gpu")
        bare_s = load_s + compute_s
        ours = np.concatenate([pq.read_table(work / "run" / "clusters" / f"{path.stem}.parquet",
                                             columns=["cluster"])["cluster"].to_numpy() for path in paths])
        agree = float((ours == labels).mean())
        result = {
            "n": args.n, "d": args.d, "k": args.k, "niter": args.niter, "fit_points": int(len(idx)),
            "backend": backend, "data_gen_s": round(gen_s, 2), "embedding_mib": mib(x.nbytes),
            "ours_s": round(ours_s, 3), "bare_faiss_s": round(bare_s, 3), "bare_load_s": round(load_s, 3),
            "bare_compute_s": round(compute_s, 3), "ratio": round(ours_s / bare_s, 3),
            "ratio_vs_compute_only": round(ours_s / compute_s, 3),
            "target_ratio": TARGET, "meets_target": ours_s / bare_s <= TARGET,
            "same_labels_as_bare": round(agree, 5), "quick": args.quick,
        }
        print(f"cluster stage {ours_s:.2f}s vs bare load + faiss {bare_s:.2f}s ({load_s:.2f}s + {compute_s:.2f}s): "
              f"{ours_s / bare_s:.2f}x (target <= {TARGET}x); labels equal on {agree:.2%} of rows", file=sys.stderr)
        report("bench_cluster", result, args.json)
        return result


if __name__ == "__main__":
    main()
