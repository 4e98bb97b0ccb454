"""EL2N as a pipeline metric: from the user's logits, or from proxy heads trained on the embeddings (docs/methods.md#el2n)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..metrics.el2n import el2n, el2n_proxy
from .base import MetricOutput, ScoreInputs


def _read_uids(path: str | Path) -> np.ndarray:
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(str)
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["uid"]).column("uid").to_numpy(zero_copy_only=False).astype(str)


def score_el2n(inp: ScoreInputs, logits: str | None = None, logits_uids: str | None = None,
               from_logits: bool = True, n_models: int = 10, epochs: int = 5, hidden: int = 0,
               lr: float = 1e-2, seed: int | None = None) -> MetricOutput:
    """Pipeline adapter. With ``logits`` (a .npy [M, n, C] or [n, C], row r = uid ``logits_uids[r]``
    from a .npy of strings or a parquet ``uid`` column) score from the user's models; otherwise train
    proxy heads on the embeddings. Needs labels; unlabelled rows and rows without logits get NaN."""
    if inp.labels is None:
        raise ValueError("el2n needs labels, but the input has none")
    labels = np.asarray(inp.labels, dtype=np.int64)
    seed = inp.seed if seed is None else seed
    scores = np.full(len(labels), np.nan)
    if logits is not None:
        if logits_uids is None:
            raise ValueError("score.params.el2n.logits needs logits_uids: rows are matched by uid, never by order")
        arr = np.load(logits, allow_pickle=False, mmap_mode="r")
        pos = {u: r for r, u in enumerate(_read_uids(logits_uids))}
        if len(pos) != arr.shape[-2]:
            raise ValueError(f"el2n: {len(pos)} unique logits uids for {arr.shape[-2]} logits rows")
        src = np.array([pos.get(str(u), -1) for u in inp.uid], dtype=np.int64)
        rows = np.flatnonzero((src >= 0) & (labels >= 0))
        order = np.argsort(src[rows], kind="stable")  # read the memmap in ascending row order
        rows, src_rows = rows[order], src[rows][order]
        arr3 = arr if arr.ndim == 3 else arr[None]
        for b0 in range(0, len(rows), 65536):
            sl = slice(b0, b0 + 65536)
            scores[rows[sl]] = el2n(arr3[:, src_rows[sl]], labels[rows[sl]], from_logits)
        info = {"route": "logits", "n_models": int(arr3.shape[0]), "scored": int(len(rows))}
    else:
        rows = np.flatnonzero(labels >= 0)
        emb = inp.embeddings if len(rows) == len(labels) else inp.embeddings[rows]  # no copy when all labelled
        scores[rows] = el2n_proxy(emb, labels[rows], n_models, epochs, hidden, seed, lr)
        info = {"route": "proxy", "n_models": int(n_models), "epochs": int(epochs), "hidden": int(hidden),
                "scored": int(len(rows))}
    return MetricOutput(scores, info)
