"""What every embed path (PIL, tensor, DALI, tables) shares: sample fields, pair members, the shard writer."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..io.files import mark_done, write_parquet
from ..io.tables import embedding_column
from .encoders import decode_input


def _empty_safe(matrix: np.ndarray) -> np.ndarray:
    return matrix.reshape(0, max(matrix.shape[1] if matrix.ndim == 2 else 0, 1)) if matrix.size == 0 else matrix


def embedding_table(rows: dict, matrix: np.ndarray, dtype: str, text_matrix: np.ndarray | None = None) -> pa.Table:
    """Our embeddings table: the row columns (strings unless given as arrow arrays), ``embedding``, and for
    image-text pairs ``text_embedding`` and ``clip_score`` (the cosine of the two, float32, from the stored
    float32 rows; ``rows`` may hold a precomputed ``clip_score`` instead, as DataComp's metadata does)."""
    cols = {name: values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=pa.string())
            for name, values in rows.items()}
    cols["embedding"] = embedding_column(_empty_safe(matrix).astype(dtype))
    if text_matrix is not None:
        cols["text_embedding"] = embedding_column(_empty_safe(text_matrix).astype(dtype))
        if "clip_score" not in cols:
            cols["clip_score"] = pa.array(clip_scores(matrix, text_matrix), pa.float32())
    return pa.table(cols)


def clip_scores(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """The CLIP score of each pair: the cosine of its L2-normalised image and caption embeddings."""
    if image.size == 0:
        return np.zeros(0, np.float32)
    return np.einsum("ij,ij->i", image.astype(np.float32), text.astype(np.float32))


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
                nan_labels: int = 0, text_matrix: np.ndarray | None = None) -> dict:
    if isinstance(rows.get("source_uid"), list) and all(v is None for v in rows["source_uid"]):
        rows = {name: values for name, values in rows.items() if name != "source_uid"}
    if text_matrix is None and cfg.embed.modality == "pair":  # a shard with no good pair: the columns still exist
        text_matrix = np.zeros((0, 1), np.float32)
    write_parquet(out_dir / f"{shard}.parquet", embedding_table(rows, matrix, cfg.embed.store_dtype, text_matrix))
    info = {"rows": len(rows["uid"]), "dim": int(matrix.shape[1]) if len(rows["uid"]) else None,
            "skipped": dict(sorted(skipped.items())), "encoder": encoder}
    if nan_labels:
        info["nan_labels"] = nan_labels  # kept with label null (missing), not skipped
    mark_done(out_dir, shard, info)
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
