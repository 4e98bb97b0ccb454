"""Benchmark: the score stage with ``score.metrics=[el2n]`` (proxy heads on labelled precomputed embeddings) at
several numbers of classes C, each in its own process: seconds, microseconds per row and peak RSS (VmHWM), against
a bare baseline: the same stage on the same rows with ``score.metrics=[random]`` (the stage's own cost: reading
the rows, writing the scores). Labels are long-tailed (80% of rows in 50 classes, the rest spread over the others).

    python scripts/bench_el2n_classes.py --classes 100,1000,10000 --n 50000 --d 128   # the issue's table
    python scripts/bench_el2n_classes.py --quick                                      # tiny (CI)
The heads' training is a fixed cost (``--max-train`` rows x ``--epochs``, growing with C) inside the stage's time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import mib, report, run_child, scratch, write_embedding_shards  # noqa: E402

PIPELINE = str(Path(__file__).resolve().parent / "bench_pipeline.py")
RSS_LIMIT_MIB = 1024  # the score stage's peak RSS, whatever C


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", default="100,1000,10000", help="comma-separated numbers of classes (each > 50)")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--shards", type=int, default=5)
    p.add_argument("--models", type=int, default=10)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-train", type=int, default=2560, help="rows the heads train on (score.params.el2n.max_train)")
    p.add_argument("--workdir", help="folder for the data and the runs (default: a temporary folder)")
    p.add_argument("--max-vm-mib", type=int, default=8192, help="address-space cap of each stage's process")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.n, args.d, args.shards, args.models, args.max_train = "60,200", 2000, 16, 2, 2, 500
    return args


def score_stage(args, work: Path, classes: int, metrics: str) -> dict:
    """Embed and cluster (cheap: k = 4) in child processes, then the score stage in its own: its seconds and
    peak RSS."""
    from datapruning.config import load_config, to_dict

    write_embedding_shards(work / "input", args.n, args.d, args.shards, k_true=16, seed=0, classes=classes)
    keys = ["embed.encoder=precomputed", "cluster.k=4", "cluster.niter=2", "embed.store_dtype=float32",
            f"score.metrics=[{metrics}]"]
    if metrics == "el2n":
        keys += [f"score.params.el2n.n_models={args.models}", f"score.params.el2n.epochs={args.epochs}",
                 f"score.params.el2n.max_train={args.max_train}"]
    (work / "bench_config.json").write_text(json.dumps(to_dict(load_config(None, keys))))
    common = [PIPELINE, "--run", str(work / "run"), "--input", str(work / "input")]
    for stage in ("embed", "cluster"):
        run_child([*common, "--child", stage])
    r = run_child([*common, "--child", "score"], max_vm_bytes=args.max_vm_mib << 20)
    return {"seconds": r["seconds"], "us_per_row": round(1e6 * r["seconds"] / args.n, 2),
            "peak_rss_mib": mib(r["peak_rss_bytes"])}


def main(argv=None) -> dict:
    args = parse(argv)
    sizes = [int(c) for c in args.classes.split(",")]
    with scratch(args.workdir, "bench_el2n_classes_") as work:
        bare = score_stage(args, work / "bare", sizes[0], "random")
        runs = {}
        for c in sizes:
            r = score_stage(args, work / f"c{c}", c, "el2n")
            r.update(time_vs_bare=round(r["seconds"] / max(bare["seconds"], 1e-9), 2),
                     rss_vs_bare=round(r["peak_rss_mib"] / bare["peak_rss_mib"], 2),
                     rss_over_bare_mib=round(r["peak_rss_mib"] - bare["peak_rss_mib"], 1))
            runs[str(c)] = r
            print(f"C={c:6d}  score {r['seconds']:8.2f}s  {r['us_per_row']:9.2f} us/row ({r['time_vs_bare']:.2f}x bare)"
                  f"  peak RSS {r['peak_rss_mib']:7.1f} MiB ({r['rss_vs_bare']:.2f}x bare)", file=sys.stderr)
    print(f"bare (random) score {bare['seconds']:.2f}s  peak RSS {bare['peak_rss_mib']:.1f} MiB", file=sys.stderr)
    result = {"n": args.n, "d": args.d, "models": args.models, "epochs": args.epochs, "max_train": args.max_train,
              "shards": args.shards, "bare": bare, "classes": runs, "rss_limit_mib": RSS_LIMIT_MIB,
              "meets_rss_limit": all(r["peak_rss_mib"] <= RSS_LIMIT_MIB for r in runs.values()), "quick": args.quick}
    report("bench_el2n_classes", result, args.json)
    return result


if __name__ == "__main__":
    main()
