"""Load a run's per-shard outputs into aligned arrays (checked by uid, never by row order alone)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io.tables import column_to_matrix, read_stage
from .common import Run, StageError


def _check_uids(expected: pa.Array, got: pa.Array, where: str) -> None:
    if not expected.equals(got):
        raise StageError(f"{where}: rows do not match the embeddings by uid; delete that file and rerun")


def load_columns(run: Run, stage: str, shard: str, expected_uids: pa.Array, columns=None) -> pa.Table:
    """One stage's parquet for ``shard``, verified to hold the same uids in the same order as the embeddings."""
    path = run.dir(stage) / f"{shard}.parquet"
    if not path.exists():
        raise StageError(f"{stage}: {path} is missing; run 'datapruning {stage}' first")
    table = read_stage(path, columns=None if columns is None else ["uid", *columns])
    _check_uids(expected_uids, table["uid"].combine_chunks(), str(path))
    return table


def label_codes(labels: list[pa.Array]) -> tuple[np.ndarray | None, tuple]:
    """Label strings -> int64 codes (-1 for null), numbers sorted numerically; None when there are no labels."""
    merged = pa.concat_arrays([a.cast(pa.string()) for a in labels]) if labels else pa.array([], pa.string())
    if len(merged) == 0 or merged.null_count == len(merged):
        return None, ()
    values = np.asarray(merged.to_pylist(), dtype=object)
    known = np.array([v is not None for v in values])
    names = sorted(set(values[known]), key=lambda v: (0, int(v), "") if _is_int(v) else (1, 0, v))
    index = {name: i for i, name in enumerate(names)}
    codes = np.array([index[v] if v is not None else -1 for v in values], dtype=np.int64)
    return codes, tuple(names)


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def load_run_arrays(run: Run, with_embeddings: bool) -> dict:
    """Concatenate every shard's uid, cluster, cos_dist, labels (and embeddings) in shard order."""
    from .cluster import shard_rows

    counts = shard_rows(run)
    n = sum(c for _, c in counts)
    uids, clusters, dists, labels, bounds = [], [], [], [], []
    matrix = None
    offset = 0
    for shard, rows in counts:
        name = shard["name"]
        path = run.dir("embed") / f"{name}.parquet"
        wanted = ["uid", "label", "embedding"] if with_embeddings else ["uid", "label"]
        table = read_stage(path, columns=[c for c in wanted if c in pq.read_schema(path).names])
        uid = table["uid"].combine_chunks()
        if with_embeddings:
            block = column_to_matrix(table["embedding"], f"embeddings/{name}.parquet")
            if matrix is None and len(block):
                matrix = np.empty((n, block.shape[1]), dtype=np.float32)
            if len(block):
                matrix[offset:offset + len(block)] = block
        cl = load_columns(run, "cluster", name, uid)
        uids.append(uid)
        clusters.append(cl["cluster"].to_numpy())
        dists.append(cl["cos_dist"].to_numpy())
        labels.append(table["label"].combine_chunks() if "label" in table.column_names
                      else pa.nulls(len(uid), pa.string()))
        bounds.append((name, offset, offset + len(uid)))
        offset += len(uid)
    uid_all = pa.concat_arrays(uids) if uids else pa.array([], pa.string())
    if len(uid_all) and pc.count_distinct(uid_all).as_py() != len(uid_all):
        dup = pc.value_counts(uid_all).filter(pc.greater(pc.struct_field(pc.value_counts(uid_all), "counts"), 1))
        raise StageError(f"duplicate uid across shards: {dup[0]['values']!s} (and {len(dup) - 1} more); "
                         "uids must be unique; fix the id column")
    codes, names = label_codes(labels)
    return {
        "uid": np.asarray(uid_all.to_pylist(), dtype=object),
        "cluster": np.concatenate(clusters).astype(np.int64) if clusters else np.zeros(0, np.int64),
        "cos_dist": np.concatenate(dists).astype(np.float32) if dists else np.zeros(0, np.float32),
        "labels": codes, "label_names": names, "bounds": bounds,
        "embeddings": matrix if with_embeddings else None,
    }


def load_scores(run: Run, arrays: dict) -> dict[str, np.ndarray]:
    """Every ``score_<metric>`` column of the score stage, concatenated in the order of ``arrays``
    (from ``load_run_arrays``) and checked by uid: {metric: float64 [N]}."""
    parts: dict[str, list] = {}
    for name, lo, hi in arrays["bounds"]:
        table = load_columns(run, "score", name, pa.array(arrays["uid"][lo:hi], pa.string()))
        for col in table.column_names:
            if col.startswith("score_"):
                parts.setdefault(col[len("score_"):], []).append(table[col].to_numpy())
    return {metric: np.concatenate(chunks) for metric, chunks in parts.items()}
