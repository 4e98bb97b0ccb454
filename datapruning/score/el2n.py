"""EL2N as a pipeline metric, from the user's own logits or from proxy heads.

See docs/methods.md#el2n-error-l2-norm-scores. User logits are matched to rows by uid; proxy heads are trained
once on a bounded, seeded, label-stratified sample of the embeddings and then applied shard by shard.
Unlabelled rows, and rows without logits, score NaN. The proxy heads see the label codes 0..C-1; a logits
column is mapped to a label by ``labels.label_columns`` (integer label c is column c; string labels by name
through ``classes``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..config import FILE
from ..metrics.el2n import BLOCK_BYTES, el2n, proxy_el2n, train_proxy_heads
from ..hashing import uid_hash
from ..labels import label_columns
from .base import Metric
from ..params import MAX_INT, setting
from .dp4tl import read_class_names
from .sample import labelled_sample
from ..errors import ConfigError, InputError

H1, H2 = 0x5EED1, 0x5EED2  # two independent 64-bit uid hashes: a 128-bit match key


@dataclass(frozen=True)
class EL2NParams:
    logits: FILE | None = None  # .npy [M, n, C] or [n, C] of your models' outputs
    logits_uids: FILE | None = None  # .npy of strings or parquet with a uid column: row r of logits is uid r
    from_logits: bool = True  # False: the file holds probabilities
    classes: FILE | None = None  # string labels: .txt (one per line) or .npy names of the logits columns
    n_models: int = setting(10, ge=1, le=1000)
    epochs: int = setting(5, ge=0, le=100_000)
    hidden: int = setting(0, ge=0, le=1 << 20)
    lr: float = setting(1e-2, gt=0.0, le=1e3)
    max_train: int | None = setting(200_000, ge=1, le=MAX_INT)  # proxy heads train on at most this many rows
    seed: int | None = setting(None, ge=0, le=MAX_INT)

    def check(self):
        if self.logits is not None and self.logits_uids is None:
            raise ConfigError("config key 'score.params.el2n.logits_uids': score.params.el2n.logits needs it: rows "
                              "are matched by uid, never by order")


def read_uids(path: str | Path) -> pa.Array:
    path = Path(path)
    if path.suffix == ".npy":
        return pa.array(np.load(path, allow_pickle=False).astype(str))
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["uid"]).column("uid").combine_chunks().cast(pa.string())


def logits_index(path: str) -> dict:
    """Sorted 128-bit uid hashes of the logits rows and their row numbers (a searchsorted lookup table)."""
    uids = read_uids(path)
    h1, h2 = uid_hash(uids, H1), uid_hash(uids, H2)
    order = np.lexsort((h2, h1))
    if len(order) > 1 and np.any((np.diff(h1[order]) == 0) & (np.diff(h2[order]) == 0)):
        raise InputError(f"el2n: {path} holds a repeated uid; each logits row needs its own uid")
    return {"h1": h1[order], "h2": h2[order], "row": order.astype(np.int64)}


def prepare(ctx, params: EL2NParams) -> dict:
    if params.logits is not None:
        arr = np.load(params.logits, allow_pickle=False, mmap_mode="r")
        index = logits_index(params.logits_uids)
        if len(index["row"]) != arr.shape[-2]:
            raise InputError(f"el2n: {len(index['row'])} logits uids for {arr.shape[-2]} logits rows")
        index["column"] = label_columns(ctx.labels, arr.shape[-1], read_class_names(params.classes),
                                        "score.params.el2n")
        return index
    _, labels, emb = labelled_sample(ctx.embedding_rows, ctx.n_classes, params.max_train)
    heads = train_proxy_heads(emb, labels, ctx.n_classes, params.n_models, params.epochs, params.hidden,
                              params.seed, params.lr)
    return {f"head{i}": h for i, h in enumerate(heads)} | {"trained_on": np.int64(len(labels))}


def score(block: dict, state: dict, params: EL2NParams) -> np.ndarray:
    labels = block["label"]
    out = np.full(len(labels), np.nan)
    if params.logits is None:
        heads = [state[f"head{i}"] for i in range(sum(k.startswith("head") for k in state))]
        rows = np.flatnonzero(labels >= 0)
        out[rows] = proxy_el2n(heads, block["embedding"][rows], labels[rows])
        return out
    h1, h2 = uid_hash(block["uid"], H1), uid_hash(block["uid"], H2)
    found = np.zeros(len(labels), dtype=bool)
    at = np.zeros(len(labels), dtype=np.int64)
    if len(state["h1"]):  # two uids sharing h1 (about n**2 / 2**64 pairs) would be missed, never mixed up
        at = np.minimum(np.searchsorted(state["h1"], h1), len(state["h1"]) - 1)
        found = (state["h1"][at] == h1) & (state["h2"][at] == h2)
    labels = np.where(labels >= 0, state["column"][np.maximum(labels, 0)], -1)  # label code -> logits column
    rows = np.flatnonzero(found & (labels >= 0))
    src = state["row"][at[rows]]
    order = np.argsort(src, kind="stable")  # read the memmap in ascending row order
    rows, src = rows[order], src[order]
    arr = np.load(params.logits, allow_pickle=False, mmap_mode="r")
    arr3 = arr if arr.ndim == 3 else arr[None]
    step = max(1, min(65536, BLOCK_BYTES // (arr3.dtype.itemsize * arr3.shape[0] * max(arr3.shape[2], 1))))
    for b0 in range(0, len(rows), step):  # the rows read at once stay within the block budget, whatever C
        sl = slice(b0, b0 + step)
        out[rows[sl]] = el2n(arr3[:, src[sl]], labels[rows[sl]], params.from_logits)
    return out


def _scored(block: dict) -> int:
    return int(np.count_nonzero(~np.isnan(block["score_el2n"])))


def summarize(rows, params: EL2NParams, state: dict) -> dict:
    scored = int(rows.reduce(_scored, sum))
    if params.logits is not None:
        arr = np.load(params.logits, allow_pickle=False, mmap_mode="r")
        return {"route": "logits", "n_models": int(arr.shape[0]) if arr.ndim == 3 else 1,
                "logits_rows": int(len(state["row"])), "scored": scored}
    return {"route": "proxy", "n_models": int(params.n_models), "epochs": int(params.epochs),
            "hidden": int(params.hidden), "trained_on": int(state["trained_on"]), "scored": scored}


def reads(params: EL2NParams) -> frozenset:
    return frozenset({"label"}) if params.logits is not None else frozenset({"label", "embedding"})


EL2N = Metric("el2n", EL2NParams, score, reads=reads, prepare=prepare, summarize=summarize)
