"""Benchmark: the SemDeDup+DBP recipe end to end on precomputed embeddings in parquet shards, each stage in its
own process: seconds and peak RSS per stage, against an absolute limit (1 GiB) and against a bare script (load
one matrix, faiss k-means + search, the library's SemDeDup and DBP) run the same way on the same data.
``--sizes`` repeats the run at several N with the same shard size and reports whether peak RSS per stage
stays flat (within 20%) and the time per row at the largest N against the smallest.

    python scripts/bench_pipeline.py --n 3000000 --d 128 --k 1000 --shards 60     # the issue's target run
    python scripts/bench_pipeline.py --sizes 1000000,3000000,10000000 --d 128 --k 1000 --shard-rows 50000
    python scripts/bench_pipeline.py --quick               # tiny (CI)
    python scripts/bench_pipeline.py --shape dup10,dup30,bigshards,k50k,longtail,tinyshards --n 200000 --skip-bare
    python scripts/bench_pipeline.py --shape wide --n 100000 --skip-bare

``--shape`` runs web-scale shapes of the data beside the uniform run of the same N and d (in the same script
run) and prints each stage's seconds and peak RSS against it, with the passes over the rows and the files each
stage wrote: ``SHAPES`` below says what each changes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datapruning.io.files import meta_dir  # noqa: E402
from datapruning.run import STAGE_DIRS  # noqa: E402
from bench_common import REPO, ChildFailed, mib, peak_rss_bytes, report, run_child, scratch, write_embedding_shards  # noqa: E402

STAGES = ("embed", "cluster", "score", "select", "manifest")
RSS_LIMIT_MIB = 1024  # every stage's peak RSS, whatever N
FLAT = 1.2  # peak RSS per stage across N: largest / smallest
SHARDS_PER_RUN = 40  # --shape: the uniform run's shard count (the 2M rows in 50k-row shards)
ROWS_PER_CLUSTER = 2000  # --shape: k = N / this (the 2M rows, k = 1,000)
LONGTAIL = ["select.method=balanced", "select.metric=ssp", "select.params={by: label}"]
# what each shape changes against the uniform run of the same N (the table of web-scale shapes)
SHAPES = {
    "uniform": {},
    "dup10": {"exact_copies": 0.10},  # 10% bit-identical copies of 64 rows: one huge cluster
    "dup30": {"exact_copies": 0.30},
    "wide": {"d": 1024, "exact_copies": 0.30},  # against a uniform run at d = 1024
    "bigshards": {"shards": 4},
    "k50k": {"k": 50_000, "set": ["cluster.max_points_per_centroid=1", "cluster.niter=2"]},  # fit on k rows
    "longtail": {"classes": 10_000, "set": LONGTAIL},  # 80% of rows in 50 classes; balanced by label
    "tinyshards": {"shard_rows": 500},
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--config", default=str(REPO / "configs" / "semdedup_dbp.yaml"))
    p.add_argument("--workdir", help="folder for the data and the run (default: a temporary folder)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--sizes", help="comma-separated N values: the flatness run (shards of --shard-rows rows)")
    p.add_argument("--shard-rows", type=int, default=50_000, help="rows per shard in the --sizes run")
    p.add_argument("--skip-bare", action="store_true", help="no bare baseline (for N whose matrix does not fit)")
    p.add_argument("--rows-per-cluster", type=int, help="--sizes: k = N / this at each N (clusters of a constant "
                   "size, as users scale k; SemDeDup's cost per row grows with the cluster size)")
    p.add_argument("--shape", help=f"comma-separated shapes to run beside the uniform run: {', '.join(SHAPES)}")
    p.add_argument("--max-vm-mib", type=int, default=4096, help="address-space cap of each stage's process "
                   "(a stage that needs more fails there, not on the machine)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--child", choices=(*STAGES, "bare"), help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.k, args.niter, args.shards = 4000, 32, 10, 5, 4
        if args.sizes:
            args.sizes, args.shard_rows = "2000,4000", 1000
    if args.shape and not set(args.shape.split(",")) <= set(SHAPES):
        p.error(f"--shape: unknown {sorted(set(args.shape.split(',')) - set(SHAPES))}; known: {', '.join(SHAPES)}")
    return args


def child_stage(stage: str, run: str, input_dir: str) -> None:
    """One stage in this fresh process; prints its seconds, this process's peak RSS and how many passes the
    stage made over the run's rows (``BlockRows`` map/reduce calls)."""
    from datapruning.rows import BlockRows
    from datapruning.runner import run_stage

    passes = [0]
    plain = BlockRows._map

    def counted(self, fn):
        passes[0] += 1
        return plain(self, fn)

    BlockRows._map = counted
    from datapruning.run import load_run_config

    cfg_path = Path(run).parent / "bench_config.json"
    from datapruning.config import config_from_dict

    cfg = config_from_dict(json.loads(cfg_path.read_text())) if stage == "embed" else load_run_config(Path(run))
    start = time.perf_counter()
    run_stage(stage, cfg, run, input_dir if stage == "embed" else None)
    print(json.dumps({"stage": stage, "seconds": round(time.perf_counter() - start, 3),
                      "peak_rss_bytes": peak_rss_bytes(), "passes": passes[0]}))


def child_bare(run: str, input_dir: str) -> None:
    """The same work without the stage machinery: one matrix in memory, library functions on it."""
    import numpy as np

    from bench_common import read_matrix
    from datapruning.cluster import assign, fit_kmeans, sample_size
    from datapruning.config import config_from_dict
    from datapruning.select import select_dbp
    from datapruning.metrics.semdedup import semdedup_filter, semdedup_scores
    from datapruning.select import SelectInputs, keep_count

    cfg = config_from_dict(json.loads((Path(run).parent / "bench_config.json").read_text()))
    times = {}
    start = time.perf_counter()
    x = read_matrix(sorted(Path(input_dir).glob("*.parquet")))
    times["load"] = time.perf_counter() - start
    size = sample_size(len(x), cfg.cluster.k, cfg.cluster.fit_fraction, cfg.cluster.max_points_per_centroid)
    idx = np.sort(np.random.default_rng(cfg.seed).choice(len(x), size, replace=False))  # a plain uniform sample
    centroids, _ = fit_kmeans(x[idx], cfg.cluster.k, cfg.cluster.niter, cfg.seed, "faiss")
    cluster, cos_dist = assign(x, centroids, len(x), "faiss")
    times["cluster"] = time.perf_counter() - start - times["load"]
    sd = cfg.score.params.get("semdedup", {})
    scores = semdedup_scores(x, cluster, cos_dist, sd.get("mode", "hard"), cfg.seed)
    eligible, _ = semdedup_filter(scores, eps=cfg.select.dedup_eps, keep_fraction=cfg.select.dedup_keep_fraction)
    times["score"] = time.perf_counter() - start - times["load"] - times["cluster"]
    n_keep = min(keep_count(len(x), cfg.select.keep_fraction, cfg.select.keep_count), int(eligible.sum()))
    inp = SelectInputs(uid=np.arange(len(x)), cluster=cluster, cos_dist=cos_dist, centroids=centroids,
                       scores={"semdedup": scores}, eligible=eligible, seed=cfg.seed)
    keep, _ = select_dbp(inp, n_keep, mode=cfg.select.mode, **cfg.select.params)
    total = time.perf_counter() - start
    times["select"] = total - sum(times.values())
    print(json.dumps({"stage": "bare", "seconds": round(total, 3), "parts": {k: round(v, 3) for k, v in times.items()},
                      "kept": int(keep.sum()), "peak_rss_bytes": peak_rss_bytes()}))


def main(argv=None) -> dict:
    args = parse(argv)
    if args.child:
        return child_bare(args.run, args.input) if args.child == "bare" else child_stage(args.child, args.run,
                                                                                         args.input)
    if args.sizes:
        return flatness(args)
    if args.shape:
        return shapes(args)
    result = one_size(args)
    report("bench_pipeline", result, args.json)
    return result


def flatness(args) -> dict:
    """The run at each N of ``--sizes`` (same shard size): peak RSS per stage and seconds per row."""
    runs, root = [], args.workdir
    for n in [int(v) for v in args.sizes.split(",")]:
        args.n, args.shards = n, max(1, n // args.shard_rows)
        if args.rows_per_cluster:
            args.k = max(1, n // args.rows_per_cluster)
        args.workdir = str(Path(root) / f"n{n}") if root else None  # one fresh folder per size
        runs.append(one_size(args))
    small, large = runs[0], runs[-1]
    rss = {s: [r["stages"][s]["peak_rss_mib"] for r in runs] for s in STAGES}
    per_row = [r["ours_s"] / r["n"] for r in runs]
    result = {
        "sizes": [r["n"] for r in runs], "d": args.d, "k": [r["k"] for r in runs], "shard_rows": args.shard_rows,
        "peak_rss_mib": rss, "rss_spread": {s: round(max(v) / min(v), 3) for s, v in rss.items()},
        "flat": all(max(v) <= FLAT * min(v) for v in rss.values()),
        "seconds": [r["ours_s"] for r in runs], "us_per_row": [round(1e6 * p, 3) for p in per_row],
        "time_per_row_largest_over_smallest": round(per_row[-1] / per_row[0], 3),
        "bare_seconds": [r.get("bare_s") for r in runs], "ours_over_bare": [r.get("ratio") for r in runs],
        "stage_us_per_row": {s: [round(1e6 * r["stages"][s]["seconds"] / r["n"], 3) for r in runs] for s in STAGES},
        "kept": [r["kept"] for r in runs],
        "same_kept_as_bare": [r.get("bare_kept") in (None, r["kept"]) for r in runs],
        "meets_rss_limit": all(r["meets_rss_limit"] for r in runs), "quick": args.quick,
        "small": small["n"], "large": large["n"],
    }
    for s in STAGES:
        print(f"{s:9s} peak RSS MiB {rss[s]}  spread {result['rss_spread'][s]:.2f}x", file=sys.stderr)
    print(f"us/row {result['us_per_row']}  largest/smallest {result['time_per_row_largest_over_smallest']:.2f}x",
          file=sys.stderr)
    report("bench_pipeline_flatness", result, args.json)
    return result


def shape_args(args, name: str):
    """The arguments of one shape's run: the uniform run's (N / ``SHARDS_PER_RUN``-row shards, k = N /
    ``ROWS_PER_CLUSTER``) changed as ``SHAPES[name]`` says."""
    spec = SHAPES[name]
    out = argparse.Namespace(**vars(args))
    out.d = spec.get("d", args.d)
    out.k = spec.get("k", max(1, args.n // ROWS_PER_CLUSTER))
    if args.quick:  # tiny N: a few rows per cluster at most
        out.k = min(out.k, max(2, args.n // 8))
    rows = spec.get("shard_rows", max(1, args.n // SHARDS_PER_RUN))
    out.shards = spec.get("shards", max(1, args.n // rows))
    out.data = {key: spec[key] for key in ("exact_copies", "classes") if key in spec}
    # groups of clusters as large a share of the data as cluster.partition_mib's 256 MiB at the 2M rows
    out.overrides = [f"cluster.partition_mib={max(1, round(256 * args.n / 2_000_000))}", *spec.get("set", [])]
    out.shape = name
    if args.workdir:
        out.workdir = str(Path(args.workdir) / name)
    return out


def shapes(args) -> dict:
    """Each ``--shape`` beside the uniform run of the same N and d: per stage its seconds and peak RSS, and their
    ratios to the uniform run's (time per row, as N is the same), the passes over the rows and the files."""
    names = args.shape.split(",")
    runs, uniform = {}, {}
    for name in names:
        sa = shape_args(args, name)
        if sa.d not in uniform:  # the baseline: the uniform shape at this N and d
            base = shape_args(args, "uniform")
            base.d = sa.d
            if args.workdir:
                base.workdir = str(Path(args.workdir) / f"uniform_d{sa.d}")
            uniform[sa.d] = one_size(base)
        runs[name] = uniform[sa.d] if name == "uniform" else one_size(sa)
    table = {}
    for name in names:
        r, u = runs[name], uniform[SHAPES[name].get("d", args.d)]
        table[name] = {s: against(r["stages"][s], u["stages"].get(s)) for s in STAGES if s in r["stages"]}
        if "failed" in r:
            table[name][r["failed"]["stage"]] = {"failed": r["failed"]["error"]}
        print(f"--- {name}: n={r['n']} d={r['d']} k={r['k']} shards={r['shards']} (uniform: k={u['k']}, "
              f"shards={u['shards']})", file=sys.stderr)
        for s, t in table[name].items():
            if "failed" in t:
                print(f"{s:9s} FAILED: {t['failed']}", file=sys.stderr)
                continue
            print(f"{s:9s} {t['seconds']:8.2f}s ({t['time_vs_uniform']:5.2f}x)  peak RSS {t['peak_rss_mib']:7.1f} MiB "
                  f"({t['rss_vs_uniform']:4.2f}x)  passes {t['passes']:3d}  files {t['files']}", file=sys.stderr)
    result = {"n": args.n, "shapes": table, "runs": runs,
              "uniform": {str(d): u for d, u in uniform.items()}, "quick": args.quick}
    report("bench_pipeline_shapes", result, args.json)
    return result


def one_size(args) -> dict:
    from datapruning.config import load_config, to_dict

    with scratch(args.workdir, "bench_pipeline_") as work:
        start = time.perf_counter()
        write_embedding_shards(work / "input", args.n, args.d, args.shards, k_true=args.k, seed=0,
                               **getattr(args, "data", {}))
        gen_s = time.perf_counter() - start
        cfg = load_config(args.config, ["embed.encoder=precomputed", f"cluster.k={args.k}",
                                        f"cluster.niter={args.niter}", "embed.store_dtype=float32",
                                        *getattr(args, "overrides", [])])
        (work / "bench_config.json").write_text(json.dumps(to_dict(cfg)))
        emb_bytes = args.n * args.d * 4
        common = [str(Path(__file__).resolve()), "--run", str(work / "run"), "--input", str(work / "input")]
        rows = []
        for stage in STAGES:
            try:
                rows.append(run_child([*common, "--child", stage], max_vm_bytes=args.max_vm_mib << 20))
            except ChildFailed as exc:
                if not getattr(args, "shape", None):
                    raise
                error = [line for line in str(exc).splitlines() if line.strip()][-1][:300]
                print(f"{stage}: FAILED: {error}", file=sys.stderr)
                return {"n": args.n, "d": args.d, "k": args.k, "shards": args.shards, "shape": args.shape,
                        "failed": {"stage": stage, "error": error}, "stages": {r["stage"]: stage_row(r) for r in rows}}
            rows[-1]["files"] = count_files(work / "run" / STAGE_DIRS[stage])
        bare = None if args.skip_bare or getattr(args, "shape", None) else run_child([*common, "--child", "bare"])
        stats = json.loads((work / "run" / "stats.json").read_text())
        worst = max(r["peak_rss_bytes"] for r in rows)
        ours_s = sum(r["seconds"] for r in rows)
        result = {
            "n": args.n, "d": args.d, "k": args.k, "niter": args.niter, "shards": args.shards,
            "config": Path(args.config).name, "data_gen_s": round(gen_s, 2), "embedding_mib": mib(emb_bytes),
            "stages": {r["stage"]: stage_row(r) for r in rows},
            "ours_s": round(ours_s, 3), "worst_stage_rss_mib": mib(worst),
            "worst_stage_rss_over_embeddings": round(worst / emb_bytes, 2), "rss_limit_mib": RSS_LIMIT_MIB,
            "meets_rss_limit": worst <= RSS_LIMIT_MIB * 2**20, "kept": stats["kept"],
            "dedup": stats["select"].get("dedup"), "quick": args.quick, "shape": getattr(args, "shape", None),
            "bytes_per_row": {"clusters": column_bytes(work / "run" / "clusters"),
                              "scores": column_bytes(work / "run" / "scores")},
        }
        if bare is not None:
            result.update({"bare_s": bare["seconds"], "bare_parts_s": bare["parts"], "bare_kept": bare["kept"],
                           "ratio": round(ours_s / bare["seconds"], 3), "bare_peak_rss_mib": mib(bare["peak_rss_bytes"])})
        for r in rows:
            print(f"{r['stage']:9s} {r['seconds']:8.2f}s  peak RSS {mib(r['peak_rss_bytes']):8.1f} MiB "
                  f"({r['peak_rss_bytes'] / emb_bytes:.2f}x embeddings)", file=sys.stderr)
        if bare is not None:
            print(f"{'bare':9s} {bare['seconds']:8.2f}s  peak RSS {mib(bare['peak_rss_bytes']):8.1f} MiB; "
                  f"ours/bare {ours_s / bare['seconds']:.2f}x", file=sys.stderr)
        return result


def against(r: dict, u: dict | None) -> dict:
    """A stage's numbers with their ratios to the uniform run's (None where the uniform stage did not run)."""
    ok = u is not None and "seconds" in u
    return {**r, "time_vs_uniform": round(r["seconds"] / max(u["seconds"], 1e-9), 2) if ok else None,
            "rss_vs_uniform": round(r["peak_rss_mib"] / u["peak_rss_mib"], 2) if ok else None}


def column_bytes(folder: Path) -> dict:
    """Compressed bytes per row of each column of a stage's parquet files (what a pass reading it decodes)."""
    import pyarrow.parquet as pq

    sizes, rows = {}, 0
    for path in folder.glob("*.parquet"):
        meta = pq.read_metadata(path)
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                sizes[col.path_in_schema] = sizes.get(col.path_in_schema, 0) + col.total_compressed_size
    return {k: round(v / max(rows, 1), 2) for k, v in sorted(sizes.items())}


def stage_row(r: dict) -> dict:
    return {"seconds": r["seconds"], "peak_rss_mib": mib(r["peak_rss_bytes"]), "passes": r["passes"],
            "files": r["files"]}


def count_files(folder: Path) -> int:
    """Files a stage left in its folder and its ``_meta`` folder (markers, parts, state)."""
    return sum(1 for top in (folder, meta_dir(folder)) if top.exists() for p in top.rglob("*") if p.is_file())


if __name__ == "__main__":
    main()
