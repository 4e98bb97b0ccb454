"""The evaluation's input read from a run folder: labelled rows, held-out split, clusters and scores."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import StageError
from ..io.files import is_done
from ..run import Run, label_codes, load_columns, load_run_arrays, load_run_config, load_scores
from .probe import stratified_split

TEST_SPLITS = ("test", "val", "valid", "validation", "heldout", "held_out", "holdout", "eval")


@dataclass(frozen=True)
class EvalData:
    """Labelled rows of a run, aligned by row. ``labels`` are the probe's target codes; ``select_labels``
    are the run's own label codes that selectors see (None without labels); ``test`` is never pruned."""

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


def _require_stages(run: Run, stages=("embed", "cluster", "score")) -> None:
    for stage in stages:
        for shard in run.shards:
            if not is_done(run.dir(stage), shard["name"]):
                raise StageError(f"eval: {run.dir(stage)} has no finished output for shard {shard['name']}; "
                                 f"run 'datapruning {stage} --output {run.output}' (or 'run') first")


def _shard_column(run: Run, name: str, uid: pa.Array, column: str) -> pa.Array | None:
    """``column`` for one shard from its embeddings parquet, else its manifest; None when neither has it."""
    for stage in ("embed", "manifest"):
        path = run.dir(stage) / f"{name}.parquet"
        if path.exists() and column in pq.read_schema(path).names:
            return load_columns(run, stage, name, uid, [column])[column].combine_chunks()
    return None


def load_eval_data(run_dir, label_column: str = "label", test_split: str | None = None,
                   test_fraction: float = 0.2) -> EvalData:
    """Embeddings, clusters, scores and labels of a run; rows without a label are left out."""
    run = Run(load_run_config(Path(run_dir)), Path(run_dir))
    _require_stages(run)
    arrays = load_run_arrays(run, with_embeddings=True)
    labels_raw, splits = [], []
    for name, lo, hi in arrays["bounds"]:
        uid = pa.array(arrays["uid"][lo:hi], pa.string())
        col = _shard_column(run, name, uid, label_column)
        if col is None:
            raise StageError(f"eval needs labels: no column {label_column!r} in {run.dir('embed') / name}.parquet "
                             "or its manifest; pass --label-column NAME")
        labels_raw.append(col)
        splits.append(_shard_column(run, name, uid, "split"))
    labels, _ = label_codes(labels_raw)
    if labels is None or (labels >= 0).sum() < 4:
        raise StageError(f"eval needs labels: column {label_column!r} of {run.output} has fewer than 4 labelled rows")
    rows = labels >= 0
    test, source = _heldout(splits, labels, rows, test_split, test_fraction, run.cfg.seed)
    scores = {m: s[rows] for m, s in load_scores(run, arrays).items()}
    if "el2n" in scores:
        scores["el2n"] = _el2n_without_heldout(run, arrays["embeddings"][rows], labels[rows], test, scores["el2n"])
    sel = arrays["labels"]
    return EvalData(uid=arrays["uid"][rows], embeddings=arrays["embeddings"][rows], labels=labels[rows], test=test,
                    cluster=arrays["cluster"][rows], cos_dist=arrays["cos_dist"][rows],
                    centroids=np.load(run.dir("cluster") / "centroids.npy", allow_pickle=False), scores=scores,
                    select_labels=None if sel is None else sel[rows], seed=run.cfg.seed, split_source=source)


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


def _heldout(splits, labels, rows, test_split, test_fraction, seed) -> tuple[np.ndarray, str]:
    """Test mask over the labelled rows: the split column when it names a test side, else stratified."""
    if all(s is not None for s in splits) and splits:
        values = np.asarray(pa.concat_arrays([s.cast(pa.string()) for s in splits]).to_pylist(), dtype=object)[rows]
        values = np.array([str(v).lower() for v in values])
        test = values == test_split.lower() if test_split else np.isin(values, TEST_SPLITS)
        if test.any() and (~test).any():
            return test, f"split column, held out: {', '.join(sorted(set(values[test])))}"
        if test_split:
            raise StageError(f"eval: --test-split {test_split!r} matches {int(test.sum())} of {len(test)} rows of "
                             f"the split column (values: {sorted(set(values))[:10]})")
    test = stratified_split(labels[rows], test_fraction, seed)
    return test, f"seeded stratified split, {test_fraction:.0%}, seed {seed}"
