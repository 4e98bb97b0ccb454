"""Manifest stage: join every stage per shard into manifest/{shard}.parquet, then kept.parquet and stats.json."""
from __future__ import annotations

import platform
from collections import Counter
from importlib import metadata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import to_dict
from ..io.files import done_path, is_done, mark_done, read_json, write_json, write_parquet
from ..run import Run, StageError, prepare_stage, progress, timed
from ..run import is_int_text, load_columns

PACKAGES = ("datapruning", "numpy", "pyarrow", "faiss-cpu", "faiss-gpu", "torch", "open_clip_torch", "webdataset")


def _labels_are_ints(run: Run) -> bool:
    for shard in run.shards:
        path = run.dir("embed") / f"{shard['name']}.parquet"
        if "label" in pq.read_schema(path).names:
            labels = pq.read_table(path, columns=["label"])["label"].drop_null().to_pylist()
            if not all(is_int_text(v) for v in labels):
                return False
    return True


def manifest_table(run: Run, name: str, int_labels: bool) -> pa.Table:
    emb_path = run.dir("embed") / f"{name}.parquet"
    meta_cols = [c for c in ("uid", "shard", "key", "label", "split") if c in pq.read_schema(emb_path).names]
    table = pq.read_table(emb_path, columns=meta_cols)
    uid = table["uid"].combine_chunks()
    if "label" in table.column_names and int_labels:
        table = table.set_column(table.column_names.index("label"), "label", pc.cast(table["label"], pa.int64()))
    for stage in ("cluster", "score", "select"):
        part = load_columns(run, stage, name, uid)
        for col in part.column_names:
            if col != "uid":
                table = table.append_column(col, part[col])
    return table


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_stats(run: Run, tables: list[pa.Table]) -> dict:
    skipped, encoders = Counter(), set()
    for shard in run.shards:
        info = read_json(done_path(run.dir("embed"), shard["name"]))
        skipped.update(info.get("skipped", {}))
        encoders.add(info.get("encoder"))
    keep = np.concatenate([t["keep"].to_numpy(zero_copy_only=False) for t in tables]) if tables else np.zeros(0, bool)
    cluster = np.concatenate([t["cluster"].to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    k = run.cfg.cluster.k
    sizes, kept = np.bincount(cluster, minlength=k), np.bincount(cluster[keep], minlength=k)
    n = len(keep)
    stats = {
        "samples_in": n, "samples_skipped": int(sum(skipped.values())), "skipped": dict(sorted(skipped.items())),
        "kept": int(keep.sum()), "kept_fraction": float(keep.mean()) if n else 0.0,
        "encoder": sorted(e for e in encoders if e)[0] if encoders - {None} else None,
        "clusters": {"k": k, "sizes": sizes.tolist(), "kept": kept.tolist()},
        "select": read_json(run.dir("select") / "_info.json"),
        "scores": read_json(run.dir("score") / "_info.json"),
        "wall_time_s": read_json(run.output / "timings.json") if (run.output / "timings.json").exists() else {},
        "config": to_dict(run.cfg), "versions": versions(),
        "manifest": str(run.dir("manifest")), "kept_list": str(run.output / "kept.parquet"),
    }
    if len(encoders - {None}) > 1:
        stats["encoders"] = sorted(encoders - {None})
    if tables and "label" in tables[0].column_names:
        labels = pa.concat_arrays([t["label"].combine_chunks().cast(pa.string()) for t in tables]).to_pylist()
        total, kept_l = Counter(labels), Counter(v for v, kk in zip(labels, keep) if kk)
        stats["labels"] = {str(lab): {"total": total[lab], "kept": kept_l[lab]}
                           for lab in sorted(total, key=lambda v: (v is None, str(v)))}
    return stats


def run_manifest(run: Run) -> dict:
    out_dir = prepare_stage(run, "manifest")
    names = [s["name"] for s in run.shards]
    int_labels = _labels_are_ints(run)
    tables = []
    with timed(run, "manifest"), progress(len(names), "manifest") as bar:
        for name in names:
            path = out_dir / f"{name}.parquet"
            if not is_done(out_dir, name):
                write_parquet(path, manifest_table(run, name, int_labels))
                mark_done(out_dir, name, {"rows": pq.read_metadata(path).num_rows})
            tables.append(pq.read_table(path))
            bar.update(1)
        if not tables:
            raise StageError("manifest: the run has no shards")
        kept = [t.filter(t["keep"]).select(["uid", "shard", "key"]) for t in tables]
        write_parquet(run.output / "kept.parquet", pa.concat_tables(kept))
    stats = build_stats(run, tables)
    write_json(run.output / "stats.json", stats)
    return stats
