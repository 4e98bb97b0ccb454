"""Manifest stage: one parquet per input shard joining every stage, then kept.parquet and stats.json.

Shards are joined as tasks on the run's executor; kept.parquet is appended shard by shard and stats.json is
added up from per-shard counts, so nothing holds the whole run.
"""
from __future__ import annotations

import platform
from collections import Counter
from functools import partial
from importlib import metadata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import to_dict
from ..errors import StageError
from ..io.files import atomic_path, done_path, is_done, mark_done, read_json, vouch, write_json, write_parquet
from ..run import Run, load_columns, prepare_stage, progress, timed

PACKAGES = ("numpy", "pyarrow", "faiss-cpu", "faiss-gpu", "torch", "open_clip_torch", "webdataset")


def integer_labels(run: Run) -> bool:
    path = run.layout.labels
    return path.exists() and read_json(path)["integer"]


OPTIONAL = ("label", "split", "source_uid")  # per-sample columns some inputs have


def optional_columns(run: Run) -> tuple:
    """The optional columns any shard's embeddings hold: every manifest file gets them (null where a shard,
    an empty one say, has none), so folder readers and HF ``datasets`` see one schema."""
    have = set()
    for shard in run.shards:
        have.update(pq.read_schema(run.layout.shard_file("embed", shard["name"])).names)
    return tuple(c for c in OPTIONAL if c in have)


def manifest_table(run: Run, name: str, int_labels: bool, optional: tuple = ()) -> pa.Table:
    emb_path = run.layout.shard_file("embed", name)
    present = pq.read_schema(emb_path).names
    table = pq.read_table(emb_path, columns=["uid", "shard", "key", *(c for c in optional if c in present)])
    for col in optional:
        if col not in present:
            table = table.append_column(col, pa.nulls(table.num_rows, pa.string()))
    table = table.select(["uid", "shard", "key", *optional])
    uid = table["uid"].combine_chunks()
    if "label" in table.column_names and int_labels:
        table = table.set_column(table.column_names.index("label"), "label", pc.cast(table["label"], pa.int64()))
    for stage, skip in (("cluster", {"uid", "tie"}), ("score", {"uid", "label"}), ("select", {"uid"})):
        part = load_columns(run, stage, name, uid)
        for col in part.column_names:
            if col not in skip:
                table = table.append_column(col, part[col])
    return table


def shard_counts(table: pa.Table, k: int) -> dict:
    """What stats.json adds up over shards: per-cluster sizes and kept counts, per-label totals and kept."""
    keep = table["keep"].to_numpy(zero_copy_only=False).astype(bool)
    cluster = table["cluster"].to_numpy().astype(np.int64)
    out = {"rows": len(keep), "kept": int(keep.sum()),
           "sizes": np.bincount(cluster[cluster >= 0], minlength=k)[:k],
           "kept_per_cluster": np.bincount(cluster[keep & (cluster >= 0)], minlength=k)[:k]}
    if "label" in table.column_names:
        labels = table["label"].cast(pa.string())
        total = pc.value_counts(labels)
        kept = pc.value_counts(labels.filter(pa.array(keep)))
        out["labels"] = {"total": dict(zip(total.field("values").to_pylist(), total.field("counts").to_pylist())),
                         "kept": dict(zip(kept.field("values").to_pylist(), kept.field("counts").to_pylist()))}
    return out


def manifest_shard(run: Run, int_labels: bool, optional: tuple, name: str) -> dict:
    """Write one shard's manifest (unless done) and return its counts."""
    path = run.layout.shard_file("manifest", name)
    if not is_done(run.dir("manifest"), name):
        write_parquet(path, manifest_table(run, name, int_labels, optional))
        mark_done(run.dir("manifest"), name, {"rows": pq.read_metadata(path).num_rows}, files=[path])
    table = pq.read_table(path, columns=[c for c in ("cluster", "keep", "label") if c in pq.read_schema(path).names])
    return {"name": name, **shard_counts(table, run.cfg.cluster.k)}


def write_kept(run: Run, names: list[str]) -> None:
    """kept.parquet (uid, shard, key of the kept rows), appended shard by shard in shard order."""
    schema = pa.schema([("uid", pa.string()), ("shard", pa.string()), ("key", pa.string())])
    with atomic_path(run.layout.kept) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="snappy") as writer:
            for name in names:
                t = pq.read_table(run.layout.shard_file("manifest", name), columns=["uid", "shard", "key", "keep"])
                kept = t.filter(t["keep"]).select(["uid", "shard", "key"]).cast(schema)
                if kept.num_rows:
                    writer.write_table(kept)


def versions() -> dict:
    from .. import __version__

    out = {"python": platform.python_version(), "datapruning": __version__}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def add_counts(total: dict | None, c: dict) -> dict:
    """Fold one shard's counts into the running total (memory: one total, whatever the shard count)."""
    if total is None:
        total = {"rows": 0, "kept": 0, "sizes": 0, "kept_per_cluster": 0, "labels": None}
    for key in ("rows", "kept", "sizes", "kept_per_cluster"):
        total[key] = total[key] + c[key]
    if "labels" in c:
        labels = total["labels"] or {"total": Counter(), "kept": Counter()}
        labels["total"].update(c["labels"]["total"])
        labels["kept"].update(c["labels"]["kept"])
        total["labels"] = labels
    return total


def build_stats(run: Run, counts: dict) -> dict:
    """stats.json from the folded per-shard ``counts`` (see ``add_counts``), the markers and the info files."""
    skipped, encoders, nan_labels = Counter(), set(), 0
    for shard in run.shards:
        info = read_json(done_path(run.dir("embed"), shard["name"]))
        skipped.update(info.get("skipped", {}))
        encoders.add(info.get("encoder"))
        nan_labels += info.get("nan_labels", 0)
    k = run.cfg.cluster.k
    n, kept = counts["rows"], counts["kept"]
    sizes = np.zeros(k, np.int64) + counts["sizes"]
    kept_c = np.zeros(k, np.int64) + counts["kept_per_cluster"]
    stats = {
        "samples_in": n, "samples_skipped": int(sum(skipped.values())), "skipped": dict(sorted(skipped.items())),
        "kept": kept, "kept_fraction": kept / n if n else 0.0,
        "encoder": sorted(e for e in encoders if e)[0] if encoders - {None} else None,
        "clusters": {"k": k, "sizes": sizes.tolist(), "kept": kept_c.tolist()},
        "select": read_json(run.info_path("select")),
        "scores": read_json(run.info_path("score")),
        "wall_time_s": read_json(run.layout.timings) if run.layout.timings.exists() else {},
        "config": to_dict(run.cfg), "versions": versions(),
        "manifest": str(run.dir("manifest")), "kept_list": str(run.layout.kept),  # absolute: RunLayout
    }
    if nan_labels:
        stats["nan_labels"] = nan_labels  # NaN float labels, kept with label null
    if len(encoders - {None}) > 1:
        stats["encoders"] = sorted(encoders - {None})
    if counts["labels"] is not None:
        total, kept_l = counts["labels"]["total"], counts["labels"]["kept"]
        stats["labels"] = {str(lab): {"total": total[lab], "kept": kept_l[lab]}
                           for lab in sorted(total, key=lambda v: (v is None, str(v)))}
    return stats


def run_manifest(run: Run) -> dict:
    out_dir = prepare_stage(run, "manifest")
    if run.info_path("manifest").exists():
        return read_json(run.layout.stats)
    names = [s["name"] for s in run.shards]
    if not names:
        raise StageError("manifest: the run has no shards")
    with timed(run, "manifest"), progress(len(names), "manifest") as bar:
        counts = None
        for c in run.executor.map_unordered(partial(manifest_shard, run, integer_labels(run), optional_columns(run)),
                                            names):
            counts = add_counts(counts, c)
            bar.update(1)
        write_kept(run, names)
    out_dir.mkdir(exist_ok=True)
    stats = build_stats(run, counts)
    write_json(run.layout.stats, stats)
    write_json(run.info_path("manifest"), {"rows": stats["samples_in"], "kept": stats["kept"],  # written last
                                           "files": vouch(run.output, [run.layout.kept, run.layout.stats])})
    return stats
