"""Precomputed-embedding inputs read as metadata and float32 matrices.

Parquet, clip-retrieval, .npy and DataComp metadata + .npz: whole, or, for parquet, in chunks of rows whose
memory follows the chunk, not the shard.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from .tables import column_to_matrix, load_npy, load_npz, open_input, parquet_errors, read_parquet


def precomputed_table(path: str, fmt: str, cfg) -> tuple[pa.Table, np.ndarray]:
    """Read one precomputed input shard whole -> (metadata table with a ``uid`` column, float32 [n, d]).
    ``cfg`` is the InputConfig (column names). Parquet is read in chunks: ``precomputed_chunks``."""
    if fmt == "clip_retrieval":
        matrix = load_npy(path).astype(np.float32, copy=False)
        part = Path(path).stem.split("_")[-1]
        meta_path = str(Path(path).parent.parent / "metadata" / f"metadata_{part}.parquet")
        meta = read_parquet(meta_path)
        if meta.num_rows != len(matrix):
            raise InputError(f"{path}: {len(matrix)} embeddings but {meta_path} has {meta.num_rows} rows")
        if cfg.id_column not in meta.column_names:  # clip-retrieval keeps image_path / url; rows align by part
            candidates = [c for c in ("key", "image_path", "url") if c in meta.column_names]
            if not candidates:
                raise InputError(f"{meta_path}: no id column {cfg.id_column!r} (nor key/image_path/url)")
            meta = meta.append_column(cfg.id_column, meta[candidates[0]].cast(pa.string()))
    elif fmt == "datacomp":
        meta = read_parquet(path)
        npz_path = path[:-len(".parquet")] + ".npz"
        matrix = load_npz(npz_path, cfg.npz_key).astype(np.float32, copy=False)
        if meta.num_rows != len(matrix):
            raise InputError(f"{npz_path}: {len(matrix)} rows in {cfg.npz_key!r} but {path} has {meta.num_rows}")
        if cfg.id_column not in meta.column_names:
            raise InputError(f"{path}: no id column {cfg.id_column!r} (have {meta.column_names})")
    elif fmt == "npy":
        matrix = load_npy(path).astype(np.float32, copy=False)
        ids_path = str(Path(path).with_suffix(".parquet"))
        meta = read_parquet(ids_path)
        if meta.num_rows != len(matrix) or cfg.id_column not in meta.column_names:
            raise InputError(f"{ids_path}: needs a {cfg.id_column!r} column with one row per row of {path}")
    else:
        raise InputError(f"{path}: format {fmt!r} is not a precomputed-embedding format")
    if matrix.ndim != 2:
        raise InputError(f"{path}: embeddings have shape {matrix.shape}, expected [n, d]")
    if meta[cfg.id_column].null_count:
        raise InputError(f"{path}: column {cfg.id_column!r} has nulls")
    return meta, np.array(matrix, dtype=np.float32)


PAIR_INPUTS = ("embed.modality=pair reads DataComp metadata (.parquet + .npz), clip-retrieval folders (img_emb/ + "
               "text_emb/) or parquet with embedding and text_embedding columns")
DATACOMP_COLUMNS = {"uid", "url", "text", "original_width", "original_height"}  # DataComp's metadata parquet


def missing_column(path: str, col: str, have: list) -> str:
    """The message for a parquet input without the id or embedding column: what it looks like and the fix."""
    if DATACOMP_COLUMNS <= set(have) or any(c.endswith("_similarity_score") for c in have):
        npz = Path(path).with_suffix(".npz").name
        return (f"{path}: DataComp metadata without its embeddings: {npz} is missing beside it (download the "
                "metadata with --download_npz, or embed the images from the shards instead)")
    return (f"{path}: missing column {col!r} (have {have[:20]}); name the columns with input.id_column and "
            "input.embedding_column (NeMo Curator writes 'id' and 'embeddings')")


def precomputed_pair(path: str, fmt: str, cfg) -> tuple[pa.Table, np.ndarray, np.ndarray, str | None]:
    """One precomputed image-text shard -> (metadata, image [n, d], caption [n, d], the metadata's CLIP score
    column or None): DataComp's .npz ``{arch}_img`` / ``{arch}_txt`` (``input.npz_key`` names the image array;
    ``clip_{arch}_similarity_score`` where the metadata has it) or clip-retrieval's img_emb/ and text_emb/ parts
    (a parquet's embedding and ``text_embedding`` columns: ``precomputed_chunks``)."""
    meta, image = precomputed_table(path, fmt, cfg)
    score = None
    if fmt == "datacomp":
        arch = cfg.npz_key.split("_")[0]
        text_path, text = path[:-len(".parquet")] + ".npz", load_npz(path[:-len(".parquet")] + ".npz", f"{arch}_txt")
        score = f"clip_{arch}_similarity_score" if f"clip_{arch}_similarity_score" in meta.column_names else None
    elif fmt == "clip_retrieval":
        part = Path(path).stem.split("_")[-1]
        text_path = str(Path(path).parent.parent / "text_emb" / f"text_emb_{part}.npy")
        if not Path(text_path).is_file():  # the folder's other side, not a fault of this shard: no retry
            raise InputError(f"{text_path}: no such file; embed.modality=pair reads text_emb/ beside img_emb/")
        text = load_npy(text_path)
    else:
        raise InputError(f"{path}: {PAIR_INPUTS}")
    if text.ndim != 2 or len(text) != len(image):
        raise InputError(f"{text_path}: caption embeddings of shape {text.shape} for {len(image)} images")
    return meta, image, np.array(text, dtype=np.float32), score




def _parquet_file(path: str) -> pq.ParquetFile:
    source = open_input(path)
    with parquet_errors(path):
        pf = pq.ParquetFile(source if isinstance(source, str) else pa.BufferReader(source), buffer_size=8 << 20,
                            pre_buffer=False)  # read through a buffer: memory follows the batch, not the row group
        _names = pf.schema_arrow.names  # pyarrow decodes names lazily: a non-UTF-8 name fails here, not later
        return pf


def _batches(pf: pq.ParquetFile, path: str, rows: int, columns=None) -> Iterator[pa.Table]:
    batches = pf.iter_batches(batch_size=rows, columns=columns, use_threads=False)
    while True:
        with parquet_errors(path):
            batch = next(batches, None)
        if batch is None:
            return
        yield pa.Table.from_batches([batch])


def precomputed_chunks(path: str, fmt: str, cfg, pair: bool, chunk_bytes: int) -> tuple[pa.Array, Iterator]:
    """One precomputed input shard as (its whole id column as strings, an iterator of chunks of consecutive rows:
    (metadata, image [m, d], caption [m, d] or None, the metadata's CLIP score column or None)). A parquet file is
    read in batches of about ``chunk_bytes`` of float32 rows (its id column first, on its own); the other formats
    come whole, in one chunk (``precomputed_table`` / ``precomputed_pair``). ``cfg``: the InputConfig."""
    if fmt != "parquet":
        meta, image, *rest = precomputed_pair(path, fmt, cfg) if pair else (*precomputed_table(path, fmt, cfg), None)
        text, score = (rest[0], rest[1]) if pair else (None, None)
        return meta[cfg.id_column].cast(pa.string()).combine_chunks(), iter([(meta, image, text, score)])
    pf = _parquet_file(path)
    have = pf.schema_arrow.names
    for col in (cfg.id_column, cfg.embedding_column):
        if col not in have:
            raise InputError(missing_column(path, col, have))
    if pair and "text_embedding" not in have:
        raise InputError(f"{path}: {PAIR_INPUTS}")
    uid = pa.chunked_array([t[cfg.id_column] for t in _batches(pf, path, 1 << 20, [cfg.id_column])],
                           pf.schema_arrow.field(cfg.id_column).type)
    if uid.null_count:
        raise InputError(f"{path}: column {cfg.id_column!r} has nulls")
    kind = pf.schema_arrow.field(cfg.embedding_column).type
    width = kind.list_size if pa.types.is_fixed_size_list(kind) else 1024  # a list's width: assume a wide one
    rows = max(1, chunk_bytes // (4 * width * (2 if pair else 1)))

    def chunks():
        for table in _batches(pf, path, rows):
            image = np.array(column_to_matrix(table[cfg.embedding_column], path), dtype=np.float32)
            meta, text = table.drop_columns([cfg.embedding_column]), None
            if pair:
                text = np.array(column_to_matrix(meta["text_embedding"], path), dtype=np.float32)
                meta = meta.drop_columns(["text_embedding"])
            yield meta, image, text, None

    return uid.cast(pa.string()).combine_chunks(), chunks()
