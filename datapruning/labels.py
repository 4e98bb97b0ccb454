"""Label coding: codes 0..C-1 in a stated order for every model the package trains, and classifier columns.

The manifest keeps the user's labels; every model (EL2N proxy heads, the DP4TL classifier, the eval probe) sees
code c = ``names[c]``, names sorted with integers by value first, then text. A supplied classifier's column for a
label is the label itself when it is an integer, else the column of that name. See
docs/methods.md#same-data-same-answer.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError, InputError
from .io.tables import is_int_text, label_sort_key

LABEL_ORDER = "code c is names[c]: integers by value, then text"


def label_coding(distinct) -> dict:
    """``{"integer": bool, "names": [...], "order": LABEL_ORDER}`` for a set of label strings. Every model the
    package trains sees the codes 0..C-1, label c being ``names[c]`` (numbers sorted numerically, then text), so
    labels {3, 17, 999} are a 3-way head; the manifest keeps the labels themselves. ``integer``: every label is a
    non-negative integer, which is then also its column in a supplied classifier (``label_columns``)."""
    names = sorted(distinct, key=label_sort_key)
    return {"integer": bool(names) and all(is_int_text(v) and int(v) >= 0 for v in names), "names": names,
            "order": LABEL_ORDER}


def value_codes(values: np.ndarray) -> tuple[dict | None, np.ndarray]:
    """Integer label values in memory (negative: unknown) -> (their ``label_coding``, int64 codes 0..C-1, -1
    unknown): arrays are coded as a run codes its labels. The coding is None when no row has a label."""
    values = np.asarray(values, dtype=np.int64)
    known = values >= 0
    classes = np.unique(values[known])
    codes = np.where(known, np.searchsorted(classes, values), -1).astype(np.int64)
    return (label_coding({str(v) for v in classes.tolist()}) if len(classes) else None), codes


def label_columns(index: dict, n_columns: int, column_names: list[str] | None, key: str,
                  fix: str | None = None) -> np.ndarray:
    """The column of a supplied classifier (logits, class text, teacher) for each label code, int64 [C]: an
    integer label is its own column (label 999 is column 999); string labels are matched by name to
    ``column_names`` (the classifier's column names), never by their sorted rank. ``key`` names the setting,
    ``fix`` how to name the columns (default: set ``key``.classes)."""
    names = list(index["names"])
    if index["integer"]:
        columns = np.array([int(v) for v in names], dtype=np.int64)
        if len(columns) and columns.max() >= n_columns:
            raise InputError(f"{key}: the classifier has {n_columns} columns, but label {names[-1]} is column "
                             f"{names[-1]} (an integer label is its own column)")
        return columns
    if column_names is None:
        raise ConfigError(f"{key}: the labels are strings, so the classifier's columns must be named; "
                          + (fix or f"set {key}.classes (a .txt with one name per line, or a .npy of names)"))
    if len(column_names) != n_columns:
        raise InputError(f"{key}: classes names {len(column_names)} columns, the classifier has {n_columns}")
    where = {str(name): i for i, name in enumerate(column_names)}
    missing = [v for v in names if v not in where]
    if missing:
        raise InputError(f"{key}: source label {missing[0]!r} is not one of the classifier's classes "
                         f"({len(missing)} missing)")
    return np.array([where[v] for v in names], dtype=np.int64)


def encode_labels(labels: pa.Array | pa.ChunkedArray, index: dict | None) -> np.ndarray | None:
    """Label strings -> int64 codes 0..C-1 by ``index`` (-1 for null or unknown); None without an index."""
    if index is None:
        return None
    labels = labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels
    codes = pc.index_in(labels, value_set=pa.array(index["names"], pa.string()))
    return np.asarray(pc.fill_null(codes, -1), dtype=np.int64)
