"""What a metric declares and receives: the score stage's contract.

A metric is a ``Metric``: its typed parameters, the unit it scores (``shard``: one input shard at a time;
``cluster``: one group of whole clusters at a time, read from the cluster stage's partitions), what it
reads (embeddings, labels), an optional ``prepare`` step that computes a small global state once (cluster
statistics, a model fitted on a bounded sample, target-data hit counts), and an optional ``summarize``
step for stats.json. The stage runs the same functions on a run folder, block by block, that
``Metric.__call__`` runs on arrays in memory, so both give the same scores.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import pyarrow as pa

from ..params import parse_params
from ..errors import InputError
from ..hashing import uid_hash
from ..rows import ArrayRows
from ..labels import value_codes

@dataclass(frozen=True)
class ScoreInputs:
    """Whole arrays for scoring in memory, aligned by row (row i is ``uid[i]``).

    embeddings: float32 [N, d], L2-normalised. cluster: int64 [N]. cos_dist: float32 [N],
    ``1 - <x_i, c_a(i)>``. centroids: float32 [k, d], normalised. labels: int64 [N] class values with
    -1 for unknown, or None when the input has no labels: models see them coded 0..C-1 in value order (as a
    run codes its labels), and label c is column c of a supplied classifier.
    """

    uid: np.ndarray
    embeddings: np.ndarray
    cluster: np.ndarray
    cos_dist: np.ndarray
    centroids: np.ndarray
    labels: np.ndarray | None = None
    label_names: tuple = ()
    seed: int = 0
    columns: dict = field(default_factory=dict)  # more per-row columns a metric reads (text, clip_score, ...)


@dataclass(frozen=True)
class MetricOutput:
    """A per-sample score (float64 [N], larger = harder) and JSON-serialisable info for stats.json."""

    scores: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What ``prepare`` and ``summarize`` may use. ``rows``: numeric blocks (pos, cluster, cos_dist, tie,
    label) of every row; ``embedding_rows``: the same with ``embedding`` (float32 [n, d]); ``centroids``;
    ``n_classes`` (0 without labels); ``seed``; ``state_dir`` for files a metric keeps between steps; ``labels``:
    the label coding (``labels.label_coding``: code c is ``labels["names"][c]``), None without labels."""

    rows: Any
    embedding_rows: Any
    centroids: np.ndarray
    n_classes: int
    seed: int
    state_dir: Any = None
    labels: dict | None = None


@dataclass(frozen=True)
class Metric:
    """One registered metric. ``score(block, state, params) -> float64 [len(block)]`` where block is a
    dict of arrays (see ``datapruning.rows``) plus ``uid`` (shard unit) and ``embedding`` when asked for.
    A cluster-unit block holds whole clusters, rows sorted by (cluster, pos)."""

    name: str
    params: type
    score: Callable
    unit: str = "shard"
    reads: Any = frozenset()  # {"embedding", "label"}, or params -> that set
    prepare: Callable | None = None
    summarize: Callable | None = None
    # a cluster-unit metric's scores for a group too large for memory:
    # stream(run, params, offsets, group, out_dir) writes the group's scores file and returns its rows
    stream: Callable | None = None

    def wants(self, params) -> frozenset:
        """What the metric reads with these parameters: a subset of {"embedding", "label"}."""
        return frozenset(self.reads(params) if callable(self.reads) else self.reads)

    def parse(self, raw: dict | None, seed: int) -> Any:
        """Typed parameters from ``score.params.<name>`` (``params.parse_params``); the run seed by default."""
        raw = dict(raw or {})
        if "seed" in {f.name for f in dataclasses.fields(self.params)} and raw.get("seed") is None:
            raw["seed"] = seed
        return parse_params(self.params, raw, f"score.params.{self.name}")

    def __call__(self, inp: ScoreInputs, **params) -> MetricOutput:
        """Score whole arrays in memory (the importable route; the stage streams the same functions)."""
        return score_in_memory(self, inp, params)


# ---- the same steps on whole arrays in memory ---------------------------------------------------------

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
    block.update(inp.columns)
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
        raise InputError(f"{metric.name} needs labels, but the input has none")
    block = array_block(inp, inp.seed)
    labels = None
    if "label" in block:  # label values -> codes 0..C-1 in value order, as a run codes them
        labels, block["label"] = value_codes(block["label"])
        if labels is None and "label" in metric.wants(params):
            raise InputError(f"{metric.name} needs labels, but no row has one (all are -1)")
    rows = ArrayRows({k: v for k, v in block.items() if k not in ("uid", "embedding")})
    emb_rows = ArrayRows({k: v for k, v in block.items() if k != "uid"})
    ctx = Context(rows=rows, embedding_rows=emb_rows, centroids=np.asarray(inp.centroids, dtype=np.float32),
                  n_classes=len(labels["names"]) if labels else 0, seed=inp.seed, labels=labels)
    state = metric.prepare(ctx, params) if metric.prepare else {}
    scores = score_block(metric, block, state, params)
    info = metric.summarize(ArrayRows({**rows.block, f"score_{metric.name}": scores}), params, state) \
        if metric.summarize else {}
    return MetricOutput(scores, info)
