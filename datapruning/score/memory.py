"""Run a metric on whole arrays in memory, through the same prepare/score/summarize steps the stage streams."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..metrics.random import uid_hash
from ..rows import ArrayRows
from .base import Context, Metric, MetricOutput, ScoreInputs


def array_block(inp: ScoreInputs, seed: int) -> dict:
    """The one block holding every row of ``inp`` (the columns a run's blocks hold)."""
    n = len(inp.cluster)
    uid = pa.array(np.asarray(inp.uid, dtype=object).astype(str)) if inp.uid is not None else None
    block = {"pos": np.arange(n, dtype=np.int64), "shard": np.zeros(n, np.int32),
             "cluster": np.asarray(inp.cluster, dtype=np.int64),
             "cos_dist": np.asarray(inp.cos_dist, dtype=np.float32).astype(np.float64),
             "tie": uid_hash(uid, seed) if uid is not None else None}
    if block["tie"] is None:
        block.pop("tie")
    if inp.labels is not None:
        block["label"] = np.asarray(inp.labels, dtype=np.int64)
    if uid is not None:
        block["uid"] = uid
    if inp.embeddings is not None:
        block["embedding"] = np.asarray(inp.embeddings, dtype=np.float32)
    return block


def score_block(metric: Metric, block: dict, state, params) -> np.ndarray:
    """Scores for every row of ``block``; a cluster-unit metric sees the rows sorted by (cluster, pos)."""
    if metric.unit == "shard":
        return np.asarray(metric.score(block, state, params), dtype=np.float64)
    out = np.full(len(block["pos"]), np.nan)
    rows = np.flatnonzero(block["cluster"] >= 0)
    rows = rows[np.lexsort((block["pos"][rows], block["cluster"][rows]))]
    sub = {k: (v[rows] if isinstance(v, np.ndarray) else v) for k, v in block.items() if k != "uid"}
    out[rows] = metric.score(sub, state, params)
    return out


def score_in_memory(metric: Metric, inp: ScoreInputs, raw_params: dict) -> MetricOutput:
    params = metric.parse(raw_params, inp.seed)
    if "label" in metric.wants(params) and inp.labels is None:
        raise ValueError(f"{metric.name} needs labels, but the input has none")
    block = array_block(inp, inp.seed)
    rows = ArrayRows({k: v for k, v in block.items() if k not in ("uid", "embedding")})
    emb_rows = ArrayRows({k: v for k, v in block.items() if k != "uid"})
    n_classes = int(block["label"].max(initial=-1)) + 1 if "label" in block else 0
    ctx = Context(rows=rows, embedding_rows=emb_rows, centroids=np.asarray(inp.centroids, dtype=np.float32),
                  n_classes=n_classes, seed=inp.seed)
    state = metric.prepare(ctx, params) if metric.prepare else {}
    scores = score_block(metric, block, state, params)
    info = metric.summarize(ArrayRows({**rows.block, f"score_{metric.name}": scores}), params, state) \
        if metric.summarize else {}
    return MetricOutput(scores, info)
