"""The evaluation's input: a bounded, seeded, label-stratified sample of a run's labelled rows.

At most ``max_rows`` rows, read shard by shard, with the held-out split, clusters and scores, in uid-hash
order: the sample, the held-out split and every probe fit are the same whatever the row order, shard names or
shard count."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import StageError
from ..io.files import is_done
from ..io.tables import label_strings
from ..rows import BlockRows, add, concat
from ..labels import encode_labels, label_coding
from ..run import Run, label_index, load_run_config, read_block, shard_offsets
from ..score.sample import labelled_sample
from .probe import stratified_split

TEST_SPLITS = ("test", "val", "valid", "validation", "heldout", "held_out", "holdout", "eval")
DEFAULT_MAX_ROWS = 200_000
NOT_LABELS = ("uid", "shard", "key", "source_uid", "embedding")  # ids and vectors: never a class column
NOT_READ = ("clusters/parts", "clusters/ties")  # stage files the eval does not read


@dataclass(frozen=True)
class EvalData:
    """The sampled labelled rows of a run, aligned by row. ``labels`` are the probe's target codes;
    ``select_labels`` are the run's own label codes that selectors see (None without labels); ``test`` is
    never pruned. ``labelled_rows`` counts every labelled row of the run, ``len(uid)`` the sample."""

    uid: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray
    test: np.ndarray
    cluster: np.ndarray
    cos_dist: np.ndarray
    centroids: np.ndarray
    scores: dict
    select_labels: np.ndarray | None = None
    seed: int = 0
    split_source: str = ""
    labelled_rows: int = 0
    max_rows: int | None = None
    label_coding: dict | None = None  # ``labels``' coding (``labels.label_coding``): code c is names[c]

    @property
    def n_classes(self) -> int:
        return int(self.labels.max(initial=-1)) + 1


def _require_stages(run: Run, stages=("embed", "cluster", "score")) -> None:
    """Every shard of ``stages`` done, with its files still there (a folder deleted to save disk is named)."""
    from ..health import stage_problems

    for stage in stages:
        for shard in run.shards:
            if not is_done(run.dir(stage), shard["name"]):
                raise StageError(f"eval: {run.dir(stage)} has no finished output for shard {shard['name']}; "
                                 f"run 'datapruning {stage} --output {run.output}' (or 'run') first")
        names = {s["name"] for s in run.shards}
        for unit, files in sorted(stage_problems(run, stage).items()):
            rel = files[0][0]  # an input shard changed since (an absolute path) is the next run's business
            if unit in names and not Path(rel).is_absolute() and not rel.startswith(NOT_READ):
                raise StageError(f"eval: {run.output / files[0][0]} is {files[0][1]}; eval reads it: rerun "
                                 f"'datapruning {stage} --output {run.output}' to make it again")


def _column(run: Run, name: str, uid: pa.Array, column: str) -> pa.Array | None:
    """``column`` of one shard from its embeddings parquet, else its manifest (checked by uid); None if absent."""
    for stage in ("embed", "manifest"):
        path = run.layout.shard_file(stage, name)
        if path.exists() and column in pq.read_schema(path).names:
            table = pq.read_table(path, columns=["uid", column])
            if not table["uid"].combine_chunks().equals(uid):
                raise StageError(f"eval: {path} does not hold the embeddings' rows in order; rerun that stage")
            return table[column].combine_chunks()
    return None


def column_index(run: Run, column: str) -> dict | None:
    """The label coding of any label column (the run's own ``label`` uses ``run.label_index``)."""
    if column == "label":
        return label_index(run)
    seen: set = set()
    for shard, _, _ in shard_offsets(run):
        uid = pq.read_table(run.layout.shard_file("embed", shard["name"]), columns=["uid"])["uid"].combine_chunks()
        col = _column(run, shard["name"], uid, column)
        if col is None:
            return None
        seen.update(pc.unique(label_strings(col)[0].drop_null()).to_pylist())
    index = label_coding(seen)
    return index if index["names"] else None


def eval_block(run: Run, column: str, index: dict, test_split: str | None, embeddings: bool, item) -> dict:
    """One shard's block with ``label`` = the eval's label codes, ``select_label`` = the run's own codes,
    ``split`` = 1 held out by the split column, 0 not, -1 no split value."""
    block = read_block(run, item, scores=True, labels=label_index(run), embeddings=embeddings, uid=True)
    block["select_label"] = block.get("label")
    uid = block["uid"]
    if column != "label":
        col = _column(run, item[0]["name"], uid, column)
        block["label"] = encode_labels(label_strings(col)[0], index) if col is not None else np.full(len(uid), -1)
    split = _column(run, item[0]["name"], uid, "split")
    if split is None:
        block["split"] = np.full(len(uid), -1, np.int8)
    else:
        low = pc.utf8_lower(split.cast(pa.string()))
        wanted = pa.array([test_split.lower()] if test_split else list(TEST_SPLITS), pa.string())
        held = np.asarray(pc.fill_null(pc.is_in(low, value_set=wanted), False), dtype=bool)
        block["split"] = np.where(np.asarray(low.is_null()), -1, held.astype(np.int8)).astype(np.int8)
    return block


def _labelled(block: dict) -> int:
    return int(np.count_nonzero(block["label"] >= 0))


def _pick(pos: np.ndarray, block: dict) -> tuple:
    at = np.isin(block["pos"], pos)
    scores = sorted(k for k in block if k.startswith("score_"))
    sel = block["select_label"] if block.get("select_label") is not None else np.full(len(at), -1)
    return (block["pos"][at], block["cluster"][at], block["cos_dist"][at], block["split"][at], sel[at],
            np.asarray(block["uid"].filter(pa.array(at)).to_pylist(), dtype=object),
            np.array(scores, dtype=object) if at.any() else np.zeros(0, object),
            np.stack([block[k][at] for k in scores], 1) if scores else np.zeros((int(at.sum()), 0)))


def _combine(parts: list) -> tuple:
    names = next((p[6] for p in parts if len(p[6])), np.zeros(0, object))
    return (*concat([p[:6] for p in parts]), names, np.concatenate([p[7] for p in parts]))


def load_eval_data(run_dir, label_column: str = "label", test_split: str | None = None,
                   test_fraction: float = 0.2, max_rows: int | None = DEFAULT_MAX_ROWS) -> EvalData:
    """A seeded, label-stratified sample of at most ``max_rows`` labelled rows (None: all) with embeddings,
    clusters, scores and labels; rows without a label are left out. Memory: the sample, never the run."""
    run = Run(load_run_config(Path(run_dir)), Path(run_dir))
    _require_stages(run)
    if label_column in NOT_LABELS:
        raise StageError(f"eval: --label-column {label_column!r} names a row id or embedding column, not class "
                         "labels; pass the column that holds each row's class")
    index = column_index(run, label_column)
    if index is None:
        raise StageError(f"eval needs labels: no column {label_column!r} in {run.dir('embed')} or the manifest "
                         f"of {run.output}; pass --label-column NAME")
    n_classes = len(index["names"])
    items = shard_offsets(run)
    n = sum(k for _, _, k in items)
    reader = partial(eval_block, run, label_column, index, test_split)
    with_emb = BlockRows(partial(reader, True), items, n)
    meta = BlockRows(partial(reader, False), items, n)
    labelled = int(meta.reduce(_labelled, add) or 0)
    if labelled < 4:
        raise StageError(f"eval needs labels: column {label_column!r} of {run.output} has fewer than 4 labelled rows")
    pos, labels, emb = labelled_sample(with_emb, n_classes, max_rows)
    p2, cluster, cos_dist, split, sel, uid, names, score_mat = meta.reduce(partial(_pick, pos), _combine)
    by_pos = np.argsort(p2, kind="stable")
    order = by_pos[np.minimum(np.searchsorted(p2[by_pos], pos), max(len(p2) - 1, 0))]  # the sample's (hash) order
    if len(p2) != len(pos) or not np.array_equal(p2[order], pos):
        raise StageError("eval: the sampled rows changed between two reads of the run; is a stage still writing?")
    cluster, cos_dist, split, sel, uid, score_mat = (a[order] for a in (cluster, cos_dist, split, sel, uid, score_mat))
    test, source = heldout(split, labels, test_split, test_fraction, run.cfg.seed)
    scores = {str(name)[len("score_"):]: score_mat[:, j] for j, name in enumerate(names)}
    if "el2n" in scores:
        scores["el2n"] = _el2n_without_heldout(run, emb, labels, test, scores["el2n"])
    return EvalData(uid=uid, embeddings=emb, labels=labels, test=test, cluster=cluster, cos_dist=cos_dist,
                    centroids=np.load(run.layout.centroids, allow_pickle=False), scores=scores,
                    select_labels=None if (sel < 0).all() else sel, seed=run.cfg.seed, split_source=source,
                    labelled_rows=labelled, max_rows=max_rows, label_coding=index)


def _el2n_without_heldout(run: Run, x: np.ndarray, labels: np.ndarray, test: np.ndarray, stored: np.ndarray):
    """The run's EL2N proxy heads saw every labelled row, held-out ones included; for the curves, retrain them
    on the training rows only (same parameters), so no held-out label shapes which rows count as hard.
    Scores from the user's own logits are kept as they are."""
    from ..metrics.el2n import el2n_proxy

    params = dict(run.cfg.score.params.get("el2n", {}))
    if params.get("logits"):
        return stored
    keys = ("n_models", "epochs", "hidden", "lr")
    out = np.full(len(labels), np.nan)
    out[~test] = el2n_proxy(x[~test], labels[~test], seed=params.get("seed", run.cfg.seed),
                            **{k: params[k] for k in keys if k in params})
    return out


def heldout(split: np.ndarray, labels: np.ndarray, test_split, test_fraction, seed) -> tuple[np.ndarray, str]:
    """Test mask over the sampled rows: the split column when it names a test side, else stratified."""
    if len(split) and (split >= 0).all():
        test = split == 1
        if test.any() and (~test).any():
            return test, f"split column, held out: {test_split or '/'.join(TEST_SPLITS[:3]) + '/...'}"
    if test_split:
        raise StageError(f"eval: --test-split {test_split!r} matches {int((split == 1).sum())} of {len(split)} "
                         "sampled rows of the split column")
    test = stratified_split(labels, test_fraction, seed)
    if not test.any():
        counts = np.bincount(labels[labels >= 0])
        raise StageError(f"eval: too few labelled rows per class to hold out a test split ({len(labels)} rows in "
                         f"{int((counts > 0).sum())} classes, at most {int(counts.max(initial=0))} per class; "
                         f"--test-fraction {test_fraction:g} of a class needs round(fraction * rows) >= 1 and a row "
                         "left to train on); label more rows, raise --test-fraction, or give a split column")
    return test, f"seeded stratified split, {test_fraction:.0%}, seed {seed}"
