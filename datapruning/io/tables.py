"""Embedding tables: our per-shard parquet, precomputed-embedding parquet, clip-retrieval and .npy inputs."""
from __future__ import annotations

import queue
import re
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import ConfigError, InputError, UnreadableFile
from ..metrics.exact import unit_rows
from .webdataset import skip


def embedding_column(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """A float32/float16 [n, d] matrix as a fixed-size-list arrow column (zero copy)."""
    matrix = np.ascontiguousarray(matrix)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def column_to_matrix(column: pa.ChunkedArray | pa.Array, where: str) -> np.ndarray:
    """A list<float> arrow column as a float32 [n, d] matrix; mixed lengths or nulls name ``where``."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if column.null_count:
        raise InputError(f"{where}: {column.null_count} rows have a null embedding")
    if pa.types.is_fixed_size_list(column.type):
        d = column.type.list_size
        values = column.flatten()
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = np.asarray(column.value_lengths())
        if len(np.unique(lengths)) != 1:
            raise InputError(f"{where}: embeddings of mixed dimensions {sorted(set(lengths.tolist()))[:5]}")
        d = int(lengths[0])
        values = column.flatten()
    else:
        raise InputError(f"{where}: the embedding column is {column.type}, expected a list of floats")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise InputError(f"{where}: embedding values are {values.type}, expected floats")
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, d)


def normalise_rows(matrix: np.ndarray, where: str, skipped: Counter, keys, strict: bool,
                   what: str = "embedding") -> np.ndarray:
    """L2-normalise rows; NaN/inf or all-zero rows are skipped (counted as non_finite_<what> / zero_<what>) or
    raise in strict mode. Returns the mask of rows kept; ``matrix`` is normalised in place."""
    finite = np.isfinite(matrix).all(axis=1)
    # scaled by the largest |value| first: the float32 norm of finite values near 1e38 overflows to inf
    scale = np.abs(np.where(finite[:, None], matrix, 0)).max(axis=1, initial=0)
    ok = finite & (scale > 0)
    for i in np.flatnonzero(~ok):
        skip(skipped, f"non_finite_{what}" if not finite[i] else f"zero_{what}", where, str(keys[i]),
             f"{what} has NaN/inf" if not finite[i] else f"{what} is all zeros", strict)
    matrix[ok] = unit_rows(matrix[ok] / scale[ok, None])
    return ok


INT_LABEL = r"[+-]?[0-9]{1,18}"  # an integer label: ASCII digits only ('\u00b2'.isdigit() is True), fits int64


def is_int_text(text: str) -> bool:
    return re.fullmatch(INT_LABEL, text) is not None


def label_sort_key(text: str) -> tuple:
    """Labels in order: integers by value first, then the rest as text."""
    return (0, int(text), text) if is_int_text(text) else (1, 0, text)


def label_text(text: str | None) -> str | None:
    """One rule for labels everywhere: an integer label is its number, so '01', '+1' and '1' are class '1'."""
    return str(int(text)) if text is not None and is_int_text(text) else text


def label_strings(column: pa.Array | pa.ChunkedArray, where: str = "label column") -> tuple[pa.Array, int]:
    """A label column as strings by ``label_text``'s rule, and how many NaN float labels became null (missing).
    A column of lists, structs or other non-scalar values is an InputError naming ``where``."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_string(kind)
            or pa.types.is_large_string(kind) or pa.types.is_boolean(kind) or pa.types.is_null(kind)):
        raise InputError(f"{where} holds {kind} values; a label is one integer or string per row")
    nan = 0
    if pa.types.is_floating(column.type):
        is_nan = pc.fill_null(pc.is_nan(column), False)
        nan = int(pc.sum(is_nan).as_py() or 0)
        column = pc.if_else(is_nan, pa.nulls(len(column), column.type), column)
    text = pc.cast(column, pa.string())
    number = pc.fill_null(pc.match_substring_regex(text, f"^{INT_LABEL}$"), False)
    if pc.any(number).as_py():
        digits = pc.replace_substring_regex(pc.if_else(number, text, "0"), "^[+]", "")  # arrow refuses '+1'
        canonical = pc.cast(pc.cast(digits, pa.int64()), pa.string())
        text = pc.if_else(number, canonical, text)
    return text, nan


def open_input(path: str) -> str | bytes:
    """An input file ready to parse: a local path (checked to open), or a remote file's bytes. A fault in
    reaching the bytes (network, permission) propagates unchanged, for the caller to retry; a fault in parsing
    them is the file's (``UnreadableFile``). Local files are parsed by path: pyarrow reading a file object with
    torch loaded can abort the process as it exits (exit 134)."""
    if "://" in path and not path.startswith("file://"):
        with fsspec.open(path, "rb") as fh:
            return fh.read()
    local = path[len("file://"):] if path.startswith("file://") else path
    open(local, "rb").close()
    return local


def _readable(source: str | bytes):
    import io

    return source if isinstance(source, str) else io.BytesIO(source)


@contextmanager
def parquet_errors(path: str) -> Iterator[None]:
    """Faults in parsing a parquet input, as the file's: a missing column is an InputError, bytes that do not
    parse (a non-UTF-8 column name included) are ``UnreadableFile``, both naming ``path``."""
    try:
        yield
    except KeyError as exc:
        raise InputError(f"{path}: missing column {exc}") from None
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"{path}: not a readable parquet file (a column name is not UTF-8: "
                             f"{exc.reason})") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UnreadableFile(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None


def read_parquet(path: str, columns=None) -> pa.Table:
    source = open_input(path)
    with parquet_errors(path):
        table = pq.read_table(source if isinstance(source, str) else pa.BufferReader(source), columns=columns)
        _names = table.column_names  # pyarrow decodes names lazily: a non-UTF-8 name fails here, not later
        return table


def load_npy(path: str) -> np.ndarray:
    source = open_input(path)
    try:
        return np.load(_readable(source), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UnreadableFile(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})") from None


def load_npz(path: str, key: str) -> np.ndarray:
    """One array of an .npz (DataComp's per-shard embeddings: l14_img, b32_img, l14_txt, b32_txt)."""
    source = open_input(path)
    try:
        with np.load(_readable(source), allow_pickle=False) as npz:
            if key not in npz.files:
                raise InputError(f"{path}: no array {key!r} (have {npz.files}); set input.npz_key")
            return npz[key]
    except (ValueError, OSError, EOFError, KeyError) as exc:
        if isinstance(exc, InputError):
            raise
        raise UnreadableFile(f"{path}: not a readable .npz file ({str(exc).splitlines()[0]})") from None


MAY_LACK = ("text", "original_width", "original_height")  # metadata a shard may not have (missing: NaN / None)


def block_columns(table: pa.Table, columns, where: str = "embeddings") -> dict:
    """Columns of an embeddings table as a block holds them: numbers as float64 (null: NaN), strings as a list
    (null: None). A ``MAY_LACK`` column the table lacks is all missing (a metric reading it scores NaN)."""
    out = {}
    for name in columns:
        if name not in table.column_names:
            if name not in MAY_LACK:
                raise InputError(f"{where}: no {name!r} column (clip_score and text_embedding come with "
                                 "embed.modality=pair)")
            out[name] = np.full(table.num_rows, np.nan) if name != "text" else [None] * table.num_rows
            continue
        col = table[name]
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[name] = col.to_pylist()
        else:
            out[name] = np.asarray(pc.fill_null(pc.cast(col, pa.float64()), np.nan).to_numpy(), dtype=np.float64)
    return out


def npz_key_for(npz_key: str, modality: str) -> str:
    """The .npz array of DataComp's metadata the ``embedding`` column comes from: ``input.npz_key`` itself, which
    must be a caption array (``*_txt``) for embed.modality=text and an image array otherwise."""
    want = "_txt" if modality == "text" else "_img"
    if not npz_key.endswith(want):
        raise ConfigError(f"input.npz_key={npz_key} is {'an image' if want == '_txt' else 'a caption'} array, but "
                         f"embed.modality={modality} embeds {'captions' if want == '_txt' else 'images'}; set "
                         f"input.npz_key={npz_key.split('_')[0]}{want}")
    return npz_key


def read_stage(path: str | Path, columns=None) -> pa.Table:
    """Read one of our own per-shard parquet outputs."""
    return pq.read_table(path, columns=columns)


BATCH_VALUES = 1 << 20  # list values (embedding floats) decoded per batch: parquet's list decoding holds ~7x this


def read_batches(path: str | Path, columns: list[str], rows: int):
    """One of our parquet outputs as tables of at most ``rows`` rows, decoded ``BATCH_VALUES`` list values at a
    time through an 8 MiB read buffer: memory follows the batch, not the file's row groups (a 500k x 1024 row
    group read whole holds ~4x its 2 GB). An empty file yields nothing."""
    pf = pq.ParquetFile(path, buffer_size=8 << 20, pre_buffer=False)
    types = [pf.schema_arrow.field(c).type for c in columns]
    width = max([t.list_size if pa.types.is_fixed_size_list(t) else 1024 if pa.types.is_list(t) else 1 for t in types])
    parts, held = [], 0
    for batch in pf.iter_batches(batch_size=max(1, min(int(rows), BATCH_VALUES // width)), columns=columns,
                                 use_threads=False):
        parts.append(batch)
        held += batch.num_rows
        if held >= rows:
            yield pa.Table.from_batches(parts)
            parts, held = [], 0
    if parts:
        yield pa.Table.from_batches(parts)


def read_ahead(items: Iterator, depth: int) -> Iterator:
    """``items`` produced on a thread, at most ``depth`` ahead of the consumer (reading overlaps the work); the
    thread is stopped and joined when the consumer finishes or stops early, and its error is raised here."""
    out: queue.Queue = queue.Queue(max(1, depth))
    stop, end = threading.Event(), object()

    def fill() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        out.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer
            out.put((end, exc))
            return
        out.put((end, None))

    thread = threading.Thread(target=fill, name="read_ahead")
    thread.start()
    try:
        while True:
            item, exc = out.get()
            if exc is not None:
                raise exc
            if item is end:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                out.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``(embeddings float32 [n, d], uid or None)`` from a .npy file, or a parquet file or folder of
    parquet files with an ``embedding`` list<float32> column and an optional ``uid`` column."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32, copy=False), None
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"dp4tl: no parquet files in {path}")
    embs, uids = [], []
    for f in files:
        table = pq.read_table(f, columns=[c for c in ("embedding", "uid") if c in pq.read_schema(f).names])
        if "embedding" not in table.column_names:
            raise InputError(f"dp4tl: {f} has no 'embedding' column")
        col = table.column("embedding").combine_chunks()
        if len(col):
            flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            embs.append(flat.reshape(len(col), -1))
        uids.append(table.column("uid").to_numpy(zero_copy_only=False) if "uid" in table.column_names else None)
    if not embs:
        raise InputError(f"dp4tl: no embeddings in {path}")
    return np.concatenate(embs), (None if any(u is None for u in uids) else np.concatenate(uids))
