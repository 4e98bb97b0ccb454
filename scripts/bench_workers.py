"""Benchmark: the same recipe with ``workers: 1`` and ``workers: N`` (one process pool for the whole command) on the
same precomputed embeddings: wall seconds of each ``datapruning run``, their ratio, and whether the manifests are
byte-identical (they must be).

    python scripts/bench_workers.py --n 600 --d 16 --k 6 --shards 3          # the 600-row run
    python scripts/bench_workers.py --n 3000000 --d 128 --k 1000 --shards 60  # the 3M x 128 run
    python scripts/bench_workers.py --quick                                   # tiny (CI)
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, report, scratch, write_embedding_shards  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", default=str(REPO / "configs" / "semdedup_dbp.yaml"))
    p.add_argument("--workdir", help="folder for the data and the runs (default: a temporary folder)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.k, args.shards = 600, 16, 6, 3
    return args


def digest(run: Path) -> str:
    h = hashlib.sha256()
    for path in sorted((run / "manifest").glob("*.parquet")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def timed_run(args, inp: Path, out: Path, workers: int) -> float:
    cmd = [sys.executable, "-m", "datapruning", "run", args.config, "--input", str(inp), "--output", str(out),
           "--set", "embed.encoder=precomputed", "--set", f"cluster.k={args.k}", "--set", f"workers={workers}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return seconds


def main(argv=None) -> dict:
    args = parse(argv)
    with scratch(args.workdir, "bench_workers_") as work:
        write_embedding_shards(work / "input", args.n, args.d, args.shards, k_true=args.k, seed=0)
        one = timed_run(args, work / "input", work / "one", 1)
        many = timed_run(args, work / "input", work / "many", args.workers)
        same = digest(work / "one") == digest(work / "many")
    result = {"n": args.n, "d": args.d, "k": args.k, "shards": args.shards, "workers": args.workers,
              "config": Path(args.config).name, "one_worker_s": round(one, 3), "many_workers_s": round(many, 3),
              "ratio": round(many / one, 3), "same_manifest": same, "quick": args.quick}
    print(f"workers=1 {one:.2f}s, workers={args.workers} {many:.2f}s: {many / one:.2f}x; "
          f"manifests {'identical' if same else 'DIFFER'}", file=sys.stderr)
    report("bench_workers", result, args.json)
    return result


if __name__ == "__main__":
    main()
