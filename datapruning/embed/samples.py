"""What both image paths (PIL and tensor/nvjpeg) and the table path share: sample fields and the shard writer."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..io.files import mark_done, write_parquet
from ..io.tables import embedding_column
from .encoders import decode_input


def embedding_table(rows: dict, matrix: np.ndarray, dtype: str) -> pa.Table:
    cols = {name: values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=pa.string())
            for name, values in rows.items()}
    if matrix.size == 0:
        matrix = matrix.reshape(0, max(matrix.shape[1] if matrix.ndim == 2 else 0, 1))
    cols["embedding"] = embedding_column(matrix.astype(dtype))
    return pa.table(cols)


ROW_NAMES = ("uid", "shard", "key", "label", "text", "source_uid")  # per-sample columns of a tar shard


def source_uid(sample: dict) -> str | None:
    """The dataset's own id of a sample: the ``uid`` in its ``.json`` (DataComp, img2dataset), else None."""
    try:
        value = json.loads(sample["json"]).get("uid")
    except (KeyError, ValueError, AttributeError, TypeError):
        return None
    return None if value is None else str(value)


def text_field(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8").strip() or None
    except UnicodeDecodeError:
        return None


def caption(sample: dict, text_keys) -> str | None:
    for key in text_keys:
        if key in sample:
            try:
                return decode_input(sample, "text", (key,), (key,))
            except ValueError:
                return None
    return None


def write_shard(cfg, out_dir: Path, shard: str, rows: dict, matrix: np.ndarray, skipped: Counter, encoder: str,
                nan_labels: int = 0, source: dict | None = None) -> dict:
    """Write the shard's embeddings parquet, then its done marker; ``source``: the input file's identity
    (``io.shards.input_identity``, taken before it was read), so a rerun notices a replaced input."""
    if isinstance(rows.get("source_uid"), list) and all(v is None for v in rows["source_uid"]):
        rows = {name: values for name, values in rows.items() if name != "source_uid"}
    path = out_dir / f"{shard}.parquet"
    write_parquet(path, embedding_table(rows, matrix, cfg.embed.store_dtype))
    info = {"rows": len(rows["uid"]), "dim": int(matrix.shape[1]) if len(rows["uid"]) else None,
            "skipped": dict(sorted(skipped.items())), "encoder": encoder}
    if nan_labels:
        info["nan_labels"] = nan_labels  # kept with label null (missing), not skipped
    if source:
        info["input"] = source
    mark_done(out_dir, shard, info, files=[path])
    return info
