"""What every embed path (PIL, tensor, DALI, tables) shares: sample fields, pair members, the shard writer."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..io.files import mark_done, write_parquet
from ..io.tables import embedding_column
from ..metrics.datacomp import clip_scores
from .encoders import decode_input


def _empty_safe(matrix: np.ndarray) -> np.ndarray:
    return matrix.reshape(0, max(matrix.shape[1] if matrix.ndim == 2 else 0, 1)) if matrix.size == 0 else matrix


def embedding_table(rows: dict, matrix: np.ndarray, dtype: str, text_matrix: np.ndarray | None = None) -> pa.Table:
    """Our embeddings table: the row columns (strings unless given as arrow arrays), ``embedding``, and for
    image-text pairs ``text_embedding`` and ``clip_score`` (the cosine of the two, float32, from the stored
    float32 rows; ``rows`` may hold a precomputed ``clip_score`` instead, as DataComp's metadata does)."""
    cols = {name: values if isinstance(values, (pa.Array, pa.ChunkedArray))
            else pa.array(values, type=pa.int64() if name in SIZE_NAMES else pa.string())
            for name, values in rows.items()}
    cols["embedding"] = embedding_column(_empty_safe(matrix).astype(dtype))
    if text_matrix is not None:
        cols["text_embedding"] = embedding_column(_empty_safe(text_matrix).astype(dtype))
        if "clip_score" not in cols:
            cols["clip_score"] = pa.array(clip_scores(matrix, text_matrix), pa.float32())
    return pa.table(cols)


SIZE_NAMES = ("original_width", "original_height")  # the image's size before any resize (DataComp, img2dataset)
ROW_NAMES = ("uid", "shard", "key", "label", "text", "source_uid", *SIZE_NAMES)  # per-sample columns of a tar shard
OPTIONAL_ROWS = ("source_uid", *SIZE_NAMES)  # left out of a shard's table where no sample has them


def json_fields(sample: dict) -> tuple:
    """From a sample's ``.json`` (DataComp, img2dataset): the dataset's own ``uid`` (a string) and the image's
    ``original_width`` and ``original_height`` (integers); None for each one missing."""
    try:
        obj = json.loads(sample["json"])
    except (KeyError, ValueError, TypeError):
        return None, None, None
    if not isinstance(obj, dict):
        return None, None, None
    uid = obj.get("uid")
    sizes = [obj.get(k) if isinstance(obj.get(k), int) and not isinstance(obj.get(k), bool) else None
             for k in SIZE_NAMES]
    return (None if uid is None else str(uid)), *sizes


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
                nan_labels: int = 0, text_matrix: np.ndarray | None = None, source: dict | None = None) -> dict:
    """Write the shard's embeddings parquet, then its done marker; ``source``: the input file's identity
    (``io.shards.input_identity``, taken before it was read), so a rerun notices a replaced input."""
    rows = {name: values for name, values in rows.items()
            if not (name in OPTIONAL_ROWS and isinstance(values, list) and all(v is None for v in values))}
    if text_matrix is None and cfg.embed.modality == "pair":  # a shard with no good pair: the columns still exist
        text_matrix = np.zeros((0, 1), np.float32)
    path = out_dir / f"{shard}.parquet"
    write_parquet(path, embedding_table(rows, matrix, cfg.embed.store_dtype, text_matrix))
    return finish_shard(out_dir, shard, path, len(rows["uid"]), int(matrix.shape[1]) if len(rows["uid"]) else None,
                        skipped, encoder, nan_labels, source)


def finish_shard(out_dir: Path, shard: str, path: Path, rows: int, dim: int | None, skipped: Counter, encoder: str,
                 nan_labels: int = 0, source: dict | None = None) -> dict:
    """The done marker of an embeddings shard written to ``path``: rows, embedding width, skip counts, encoder,
    NaN labels kept as missing, and the input file's identity; it vouches for the file."""
    info = {"rows": rows, "dim": dim, "skipped": dict(sorted(skipped.items())), "encoder": encoder}
    if nan_labels:
        info["nan_labels"] = nan_labels  # kept with label null (missing), not skipped
    if source:
        info["input"] = source
    mark_done(out_dir, shard, info, files=[path])
    return info


def sample_caption(sample: dict, icfg) -> str:
    """The caption of an image-text pair (raises BadSample: missing_text, bad_text_encoding, bad_json)."""
    return decode_input(sample, "text", icfg.text_keys, icfg.text_keys)


def image_bytes(sample: dict, icfg) -> bytes | str:
    """The encoded image of a sample, or the reason ``missing_image``."""
    ext = next((k for k in icfg.image_keys if k in sample), None)
    return sample[ext] if ext else "missing_image"


def pair_reasons(batch: list, icfg) -> tuple[list, list]:
    """Per sample: its caption (None when the sample has a reason) and the reason it is no pair (missing
    image first, then a caption that is missing or unreadable), or None."""
    texts, reasons = [], []
    for _, sample in batch:
        reason = "missing_image" if isinstance(image_bytes(sample, icfg), str) else None
        try:
            text = sample_caption(sample, icfg)
        except ValueError as exc:
            text, reason = None, reason or str(exc)
        texts.append(text)
        reasons.append(reason)
    return texts, reasons
