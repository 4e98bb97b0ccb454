"""Benchmark: our cluster stage (fit on the sample + streaming assignment, parquet in and out) against a bare
script that loads the same parquet into one matrix and runs ``faiss.Kmeans`` + ``index.search`` with the same
k, niter and sample. Target <= 1.3x. The compute-only ratio (bare without its load) is printed too.

    python scripts/bench_cluster.py                 # 1M x 512, k=500 (the SemDeDup+DBP recipe's k)
    python scripts/bench_cluster.py --quick         # tiny, seconds (CI)
    python scripts/bench_cluster.py --backend torch # our torch k-means (CUDA when present) vs bare faiss
    python scripts/bench_cluster.py --compute-only --n 2000000 --k 16384   # the GPU target: fit + assignment
                                                    # on an in-memory matrix, torch CUDA vs faiss on the CPU

--compute-only times what the stage calls once its rows are in memory (``torch_kmeans`` on the fit sample,
then ``torch_assign`` over every row), per assignment precision, and checks the assignment against an exact
fp32 one. faiss on the CPU at that size would take minutes, so it runs on ``--faiss-rows`` rows for
``--faiss-niter`` iterations and is scaled linearly in rows and iterations (k-means costs n k d per pass).
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
    p.add_argument("--compute-only", action="store_true",
                   help="time fit + assignment on an in-memory matrix (no parquet), torch k-means vs faiss CPU")
    p.add_argument("--precisions", default="bf16,tf32", help="--compute-only: torch assignment precisions")
    p.add_argument("--device", default="auto", help="--compute-only: torch device (auto: cuda when present)")
    p.add_argument("--faiss-rows", type=int, default=100_000, help="--compute-only: rows faiss runs on")
    p.add_argument("--faiss-niter", type=int, default=2, help="--compute-only: iterations faiss runs")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.k, args.niter, args.shards = 3000, 32, 12, 5, 3
        args.faiss_rows = min(args.faiss_rows, 3000)
    return args


def synth_matrix(n: int, d: int, k_true: int, seed: int, device: str, spread: float = 0.04) -> np.ndarray:
    """n unit vectors around k_true random centres (made on ``device``, in blocks; returned on the host)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(k_true, d, generator=g, device=device)
    centres /= centres.norm(dim=1, keepdim=True)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 18):
        m = min(1 << 18, n - s)
        ids = torch.randint(k_true, (m,), generator=g, device=device)
        x = centres[ids] + spread * torch.randn(m, d, generator=g, device=device)
        out[s:s + m] = (x / x.norm(dim=1, keepdim=True)).cpu().numpy()
    return out


def exact_agreement(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, device: str, rows: int) -> dict:
    """Share of the first ``rows`` labels equal to an exact fp32 argmax (tf32 off), and the largest similarity
    given up where they differ (a near-tie when tiny)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    xs = torch.from_numpy(np.ascontiguousarray(x[:rows])).to(device)
    labels = labels[:rows]
    c = torch.from_numpy(centroids).to(device)
    best, gap = [], []
    for s in range(0, len(xs), 4096):
        sims = xs[s:s + 4096] @ c.T
        b = sims.argmax(dim=1)
        chosen = torch.from_numpy(labels[s:s + 4096]).to(device)
        gap.append((sims.gather(1, b[:, None]) - sims.gather(1, chosen[:, None]))[:, 0])
        best.append(b)
    best, gap = torch.cat(best).cpu().numpy(), torch.cat(gap).cpu().numpy()
    return {"rows": int(len(best)), "same_as_exact_fp32": round(float((best == labels[:rows]).mean()), 6),
            "max_sim_given_up": float(gap.max()) if len(gap) else 0.0}


def compute_only(args) -> dict:
    """torch k-means fit + assignment per precision against faiss on the CPU (scaled), same matrix."""
    import faiss
    import torch

    from datapruning.cluster.kmeans_torch import torch_assign, torch_kmeans

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    t0 = time.perf_counter()
    x = synth_matrix(args.n, args.d, args.k, 0, device)
    gen_s = time.perf_counter() - t0
    warm = x[: min(len(x), 4 * args.k)]
    torch_kmeans(warm, args.k, 1, 0, device=device)  # CUDA context, cuBLAS handles, allocator: not timed
    runs = {}
    for precision in [p for p in args.precisions.split(",") if p]:
        if device == "cpu" and precision == "tf32":
            continue
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        centroids, stats = torch_kmeans(x, args.k, args.niter, 0, device=device, precision=precision)
        sync()
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        labels, _ = torch_assign(x, centroids, device=device, precision=precision)
        assign_s = time.perf_counter() - start
        runs[precision] = {"fit_s": round(fit_s, 3), "assign_s": round(assign_s, 3),
                           "fit_plus_assign_s": round(fit_s + assign_s, 3), "iterations": stats["iterations"],
                           "splits": stats["splits"], "objective": stats["objective"],
                           **exact_agreement(x, centroids, labels, device, min(len(x), 200_000))}
        print(f"torch k-means {precision} on {device}: fit {fit_s:.2f}s + assign {assign_s:.2f}s", file=sys.stderr)
    rows = min(args.faiss_rows, len(x))
    sample = np.ascontiguousarray(x[:rows])
    km = faiss.Kmeans(args.d, args.k, niter=args.faiss_niter, spherical=True, seed=0,
                      max_points_per_centroid=-(-rows // args.k), verbose=False)
    start = time.perf_counter()
    km.train(sample)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    km.index.search(sample, 1)
    search_s = time.perf_counter() - start
    scale = args.n / rows
    faiss_est = train_s * scale * args.niter / args.faiss_niter + search_s * scale
    best = min(runs.values(), key=lambda r: r["fit_plus_assign_s"]) if runs else None
    return {"mode": "compute_only", "n": args.n, "d": args.d, "k": args.k, "niter": args.niter, "device": device,
            "data_gen_s": round(gen_s, 2), "torch": runs,
            "faiss_cpu": {"threads": faiss.omp_get_max_threads(), "rows": rows, "niter": args.faiss_niter,
                          "train_s": round(train_s, 3), "search_s": round(search_s, 3),
                          "estimated_fit_plus_assign_s": round(faiss_est, 1)},
            "best_torch_s": best["fit_plus_assign_s"] if best else None,
            "speedup_vs_faiss_cpu": round(faiss_est / best["fit_plus_assign_s"], 1) if best else None,
            "target_s": 2.5, "quick": args.quick}


def bare_faiss(x: np.ndarray, idx: np.ndarray, k: int, niter: int, seed: int, gpu: bool) -> tuple[np.ndarray, float]:
    """The baseline: plain faiss on the same sample from the same start (``idx[:k]``), then one search over every
    row."""
    import faiss

    start = time.perf_counter()
    sample = x[idx]
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, gpu=gpu,
                      max_points_per_centroid=-(-len(sample) // k), verbose=False)
    km.train(sample, init_centroids=sample[:k])
    _, labels = km.index.search(x, 1)
    return labels[:, 0], time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse(argv)
    if args.compute_only:
        result = compute_only(args)
        report("bench_cluster", result, args.json)
        return result
    from datapruning.cluster import resolve_backend, sample_size
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

        import pyarrow as pa
        import pyarrow.parquet as pq

        from datapruning.metrics.random import uid_hash

        start = time.perf_counter()
        x = read_matrix(paths)  # a bare script loads its embeddings too
        load_s = time.perf_counter() - start
        size = sample_size(len(x), args.k, None, cfg.cluster.max_points_per_centroid)
        uids = pa.concat_arrays([pq.read_table(p, columns=["uid"])["uid"].combine_chunks() for p in paths])
        idx = np.lexsort((np.arange(len(x)), uid_hash(uids, cfg.seed)))[:size]  # the stage's sample and start
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
