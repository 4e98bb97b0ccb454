"""Benchmark: what done markers that vouch for their files cost. Writes embedding shards as the embed stage does
(``write_parquet``), then the same with their marker's file record (size, a digest of the ends, sha256), and
checks every record again as a rerun does; prints seconds and the ratios against the bare writes.

    python scripts/bench_markers.py                  # 8 shards of 50,000 x 512 float32 (~800 MB)
    python scripts/bench_markers.py --quick          # tiny (CI)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datapruning.io.files import file_problem, file_record, write_parquet  # noqa: E402
from datapruning.io.tables import embedding_column  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.shards, args.rows, args.d = 2, 2_000, 64
    rng = np.random.default_rng(0)
    tables = [pa.table({"uid": [f"s{s}-{i}" for i in range(args.rows)],
                        "embedding": embedding_column(rng.normal(size=(args.rows, args.d)).astype(np.float32))})
              for s in range(args.shards)]
    with tempfile.TemporaryDirectory(prefix="bench-markers-") as work:
        paths = [Path(work) / f"{s:05d}.parquet" for s in range(args.shards)]
        start = time.perf_counter()
        for path, table in zip(paths, tables):
            write_parquet(path, table)
        bare = time.perf_counter() - start
        start = time.perf_counter()
        records = []
        for path, table in zip(paths, tables):
            write_parquet(path, table)
            records.append(file_record(path))
        vouched = time.perf_counter() - start
        start = time.perf_counter()
        problems = [file_problem(path, record) for path, record in zip(paths, records)]
        check = time.perf_counter() - start
        if problems != [None] * len(paths):
            raise SystemExit(f"a file record does not match its file: {problems}")
        size = sum(path.stat().st_size for path in paths)
    result = {"shards": args.shards, "rows": args.rows, "d": args.d, "bytes": size, "write_s": round(bare, 3),
              "write_and_record_s": round(vouched, 3), "record_over_write": round(vouched / bare, 3),
              "check_s": round(check, 4), "check_over_write": round(check / bare, 4)}
    print(result)
    return result


if __name__ == "__main__":
    main()
