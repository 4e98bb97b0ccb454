"""Teacher logits as the cache stores them: float16 full logits shifted to a max of 0, or top-k plus a tail bin."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def shifted(logits: np.ndarray) -> np.ndarray:
    """Logits minus each row's max (float32): softmax is unchanged, and float16 is finest where the mass is."""
    logits = np.asarray(logits, dtype=np.float32)
    return logits - logits.max(axis=1, keepdims=True) if logits.size else logits


def topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k largest shifted logits per row, descending (ties: lower class first), as float16 values and int32
    indices, and the tail: float32 [n, len(TAIL_TEMPERATURES)] logsumexp of the other shifted logits / T."""
    from .kd import TAIL_TEMPERATURES

    z = shifted(logits)
    k = min(k, z.shape[1])
    idx = np.argsort(-z, axis=1, kind="stable")[:, :k]
    rest = z.copy()
    np.put_along_axis(rest, idx, -np.inf, axis=1)
    tail = np.full((len(z), len(TAIL_TEMPERATURES)), -np.inf, np.float32)
    if k < z.shape[1]:
        for c, T in enumerate(TAIL_TEMPERATURES):
            r = rest.astype(np.float64) / T
            top = r.max(axis=1, keepdims=True)
            tail[:, c] = (top[:, 0] + np.log(np.exp(r - top).sum(axis=1))).astype(np.float32)
    return as_float16(np.take_along_axis(z, idx, axis=1))[0], idx.astype(np.int32), tail


FLOAT16_LOWEST = float(np.finfo(np.float16).min)  # -65504: a shifted logit below it would be stored as -inf


def as_float16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Shifted logits (all <= 0) as float16, those below ``FLOAT16_LOWEST`` clamped to it (a class that far below
    the top has probability 0 at any temperature either way), and how many were clamped."""
    low = values < FLOAT16_LOWEST
    return np.where(low, FLOAT16_LOWEST, values).astype(np.float16), int(np.count_nonzero(low))


def _fixed(values: np.ndarray, n: int, width: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width) if n else \
        pa.array([], pa.list_(pa.from_numpy_dtype(values.dtype), width))


def full_table(uids: list[str], logits: np.ndarray) -> tuple[pa.Table, int]:
    """uid and ``logits``: every class's logit minus the row's max, float16 [C]; and how many were clamped."""
    z, clamped = as_float16(shifted(logits))
    return pa.table({"uid": pa.array(uids, pa.string()),
                     "logits": _fixed(z, len(z), z.shape[1] if z.ndim == 2 else 0)}), clamped


def topk_table(uids: list[str], logits: np.ndarray, k: int) -> tuple[pa.Table, int]:
    """uid, ``topk_values`` float16 [k], ``topk_indices`` int32 [k] and ``tail_lse`` float32 [temperatures]; and
    how many stored values were clamped (``as_float16``)."""
    from .kd import TAIL_TEMPERATURES

    if len(logits):
        values, indices, tail = topk(logits, k)
    else:
        values, indices = np.zeros((0, k), np.float16), np.zeros((0, k), np.int32)
        tail = np.zeros((0, len(TAIL_TEMPERATURES)), np.float32)
    n = len(values)
    clamped = int(np.count_nonzero(values == np.float16(FLOAT16_LOWEST)))
    return pa.table({"uid": pa.array(uids, pa.string()), "topk_values": _fixed(values, n, values.shape[1]),
                     "topk_indices": _fixed(indices, n, indices.shape[1]),
                     "tail_lse": _fixed(tail, n, tail.shape[1])}), clamped
