"""DP4TL as pipeline metrics: target hits per source class (LM) or source cluster (FM).

See docs/methods.md#dp4tl-transfer-aware-pruning. Every source sample scores the number of target samples that
map to its source class (label mapping, LM) or source cluster (feature mapping, FM). The mapping runs once in
``prepare``; scoring a shard is a lookup. The linear route's classifier sees the run's label codes 0..C-1; a
supplied classifier's columns (or text rows) are mapped to them by ``labels.label_columns``: an integer label is its
own column (label 999 is column 999), string labels are matched by name through ``classes``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import FILE
from ..io.tables import read_embeddings
from ..metrics.dp4tl import (feature_mapping_assign, feature_mapping_freq, label_mapping_freq,
                             lm_predictions_from_logits, train_linear_source_classifier, zero_shot_predictions)
from ..labels import label_columns
from .base import Metric
from ..params import MAX_INT, setting
from .sample import labelled_sample
from ..errors import ConfigError


@dataclass(frozen=True)
class LMParams:
    target: FILE | None = None  # target embeddings (.npy, or parquet file/folder with an embedding column)
    # linear: a classifier trained on the source | logits: the user's classifier | zeroshot: class-name text
    route: str = setting("linear", choices=("linear", "logits", "zeroshot"))
    logits: FILE | None = None  # route logits: .npy [n_target, C] of a source classifier on the target
    class_text: FILE | None = None  # route zeroshot: .npy [C, d] text embeddings of the class names
    classes: FILE | None = None  # logits/zeroshot with string labels: .txt (one per line) or .npy names of columns
    epochs: int = setting(10, ge=0, le=100_000)
    max_samples: int | None = setting(200_000, ge=1, le=MAX_INT)  # the linear route trains on at most this many rows
    seed: int | None = setting(None, ge=0, le=MAX_INT)

    def check(self):
        need = {"logits": "logits", "zeroshot": "class_text"}.get(self.route)
        if need and getattr(self, need) is None:
            raise ConfigError(f"dp4tl_lm route={self.route} needs score.params.dp4tl_lm.{need}")
        if self.route != "logits" and self.target is None:
            raise ConfigError(f"dp4tl_lm route={self.route} needs score.params.dp4tl_lm.target (target embeddings)")


@dataclass(frozen=True)
class FMParams:
    target: FILE | None = None  # target embeddings

    def check(self):
        if self.target is None:
            raise ConfigError("dp4tl_fm needs score.params.dp4tl_fm.target (target embeddings)")


def lm_predictions(ctx, params: LMParams) -> tuple[np.ndarray, int]:
    """Source-class prediction for every target sample, and the classifier's class count."""
    if params.route == "logits":
        arr = np.load(params.logits, allow_pickle=False, mmap_mode="r")
        return lm_predictions_from_logits(arr), arr.shape[1]
    target_emb, _ = read_embeddings(params.target)
    if params.route == "zeroshot":
        text = np.load(params.class_text, allow_pickle=False)
        return zero_shot_predictions(target_emb, text), len(text)
    _, labels, emb = labelled_sample(ctx.embedding_rows, ctx.n_classes, params.max_samples)
    clf = train_linear_source_classifier(emb, labels, params.seed, params.epochs, max_samples=None,
                                         n_classes=ctx.n_classes)
    return clf.predict(target_emb), len(clf.bias)


def read_class_names(path: str | None) -> list[str] | None:
    """The column names of a supplied classifier: a .txt (one per line) or .npy of names; None without a path."""
    if path is None:
        return None
    if path.endswith(".npy"):
        return [str(v) for v in np.load(path, allow_pickle=False).tolist()]
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare_lm(ctx, params: LMParams) -> dict:
    pred, n_columns = lm_predictions(ctx, params)
    freq = label_mapping_freq(pred, n_columns)
    if params.route != "linear":  # the classifier's columns -> the run's label codes
        freq = freq[label_columns(ctx.labels, n_columns, read_class_names(params.classes), "score.params.dp4tl_lm")]
    return {"freq": freq, "n_target": np.int64(len(pred))}


def prepare_fm(ctx, params: FMParams) -> dict:
    target_emb, _ = read_embeddings(params.target)
    freq = feature_mapping_freq(feature_mapping_assign(target_emb, ctx.centroids), len(ctx.centroids))
    return {"freq": freq, "n_target": np.int64(len(target_emb))}


def score_lm(block: dict, state: dict, params) -> np.ndarray:
    labels = block["label"]
    return np.where(labels >= 0, state["freq"][np.maximum(labels, 0)], np.nan).astype(np.float64)


def score_fm(block: dict, state: dict, params) -> np.ndarray:
    cluster = block["cluster"]
    return np.where(cluster >= 0, state["freq"][np.maximum(cluster, 0)], np.nan).astype(np.float64)


def summarize(rows, params, state: dict) -> dict:
    freq = state["freq"]
    info = {"n_target": int(state["n_target"]), "freq": freq.tolist(), "zero_hit_groups": int((freq == 0).sum())}
    if isinstance(params, LMParams):
        info["route"] = params.route
    return info


DP4TL_LM = Metric("dp4tl_lm", LMParams, score_lm, reads=frozenset({"label"}), prepare=prepare_lm, summarize=summarize)
DP4TL_FM = Metric("dp4tl_fm", FMParams, score_fm, prepare=prepare_fm, summarize=summarize)
