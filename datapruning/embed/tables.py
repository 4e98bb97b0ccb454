"""The embed stage for precomputed embeddings: an input shard copied into our layout.

Rows are L2-normalised, bad rows and repeated uids counted, in chunks of rows (``io.precomputed``): memory
follows the chunk, not the shard.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .samples import SIZE_NAMES, embedding_table, finish_shard, write_shard
from ..errors import InputError, UnreadableFile
from ..io.files import RowGroupWriter
from ..io.precomputed import precomputed_chunks
from ..io.tables import label_strings, normalise_rows
from ..io.webdataset import skip
from ..metrics.datacomp import clip_scores

log = logging.getLogger("datapruning")
CHUNK_BYTES = 32 << 20  # float32 embedding rows read and checked per step
GROUP_BYTES = 64 << 20  # float32 embedding rows per row group of the output (its bytes follow d, not the chunks)


def embed_table_shard(cfg, path: str, shard: str, fmt: str, out_dir: Path, source: dict | None = None) -> dict:
    """Copy one precomputed-embedding shard into ``out_dir/<shard>.parquet``, then its done marker. A row whose
    embedding is not finite or all zeros is skipped and counted, as is a later copy of a valid row's uid (the
    first valid copy stays). Columnar throughout (no per-row Python objects)."""
    icfg, skipped, pair = cfg.input, Counter(), cfg.embed.modality == "pair"
    out, kept, nan_labels, dim = out_dir / f"{shard}.parquet", 0, 0, None
    try:
        uid_all, chunks = precomputed_chunks(path, fmt, icfg, pair, CHUNK_BYTES)
        codes = pc.dictionary_encode(uid_all).indices.to_numpy(zero_copy_only=False)
        seen = np.zeros(int(codes.max(initial=-1)) + 1, dtype=bool)  # a valid row with this uid was kept
        with RowGroupWriter(out) as writer:
            start = 0
            for meta, image, text, score_col in chunks:
                rows, image, text, nan = chunk_rows(cfg, shard, path, meta, image, text, score_col,
                                                    codes[start:start + len(image)], seen, skipped)
                start += len(meta)
                if len(image):
                    if dim is not None and image.shape[1] != dim:
                        raise InputError(f"{path}: embeddings of mixed dimensions {sorted({dim, image.shape[1]})}")
                    dim = image.shape[1]
                    writer.rows = writer.rows or max(1, GROUP_BYTES // (4 * dim))
                writer.add(embedding_table(rows, image, cfg.embed.store_dtype, text))
                kept, nan_labels = kept + len(image), nan_labels + nan
    except UnreadableFile as exc:  # bytes that do not parse: skipped and counted, as a corrupt tar is
        skipped = Counter()
        skip(skipped, "unreadable_shard", shard, None, str(exc), cfg.strict)
        return write_shard(cfg, out_dir, shard, {"uid": [], "shard": [], "key": []}, np.zeros((0, 1), np.float32),
                           skipped, "precomputed", source=source)
    if nan_labels:
        log.warning("shard %s: %d NaN labels read as missing (label null)", shard, nan_labels)
    return finish_shard(out_dir, shard, out, kept, dim, skipped, "precomputed", nan_labels, source)


def chunk_rows(cfg, shard: str, path: str, meta: pa.Table, image: np.ndarray, text, score_col, codes: np.ndarray,
               seen: np.ndarray, skipped: Counter) -> tuple[dict, np.ndarray, np.ndarray | None, int]:
    """One chunk's kept rows: (row columns, image rows, caption rows or None, NaN labels read as missing).
    ``codes``: the chunk's uids as codes of the shard's uids; ``seen`` marks the codes already kept."""
    icfg, pair = cfg.input, text is not None
    uid = pc.cast(meta[icfg.id_column], pa.string()).combine_chunks()
    ok = normalise_rows(image, shard, skipped, uid, cfg.strict)
    if pair:  # a row whose image is already skipped is not counted again for its caption
        rows_ok = np.flatnonzero(ok)
        sub = text[rows_ok]
        ok[rows_ok] = normalise_rows(sub, shard, skipped, uid.take(pa.array(rows_ok)), cfg.strict, "text_embedding")
        text[rows_ok] = sub
    valid = np.flatnonzero(ok)
    first = np.zeros(len(valid), dtype=bool)
    first[np.unique(codes[valid], return_index=True)[1]] = True
    repeated = valid[seen[codes[valid]] | ~first]
    for i in repeated:  # the first valid copy of a uid stays
        skip(skipped, "duplicate_key", shard, str(uid[i]), "uid repeats within the shard", cfg.strict)
    ok[repeated] = False
    seen[codes[ok]] = True
    keep = pa.array(ok)
    rows = {"uid": uid, "shard": pa.array([shard], pa.string()).take(pa.array(np.zeros(len(ok), np.int64))),
            "key": uid}
    nan_labels = 0
    if icfg.label_column in meta.column_names:
        rows["label"], nan_labels = label_strings(meta[icfg.label_column].filter(keep),
                                                  f"{path}: column {icfg.label_column!r}")
    for src, name in ((icfg.split_column, "split"), ("caption", "text"),
                      ("text", "text"), ("uid", "source_uid")):  # "uid": DataComp's own id column
        if src in meta.column_names and name not in rows:
            rows[name] = pc.cast(meta[src], pa.string()).filter(keep)
    for name in SIZE_NAMES:
        if name in meta.column_names and pa.types.is_integer(meta[name].type):
            rows[name] = pc.cast(meta[name], pa.int64()).filter(keep)
    for name in ("uid", "shard", "key"):
        rows[name] = rows[name].filter(keep)
    if pair and score_col is not None:
        rows["clip_score"] = stored_clip_score(meta[score_col].filter(keep), image[ok], text[ok],
                                               f"shard {shard}, {score_col}")
    return rows, image[ok], text[ok] if pair else None, nan_labels


def stored_clip_score(given, image: np.ndarray, text: np.ndarray, where: str) -> pa.Array:
    """The metadata's CLIP score (DataComp's, from the float32 embeddings before they were stored as float16),
    checked against the cosine of the stored embeddings: a gap above 0.01 is logged (input.npz_key of another
    model?). A missing value is replaced by the cosine."""
    values = np.asarray(pc.fill_null(pc.cast(given, pa.float64()), np.nan).to_numpy(), dtype=np.float64)
    cos = clip_scores(image, text).astype(np.float64)
    known = np.isfinite(values)
    gap = float(np.abs(values[known] - cos[known]).max(initial=0.0))
    if gap > 0.01:
        log.warning("%s differs from the cosine of the stored embeddings by up to %.3f; are they from the same "
                    "model (input.npz_key)?", where, gap)
    return pa.array(np.where(known, values, cos).astype(np.float32), pa.float32())
