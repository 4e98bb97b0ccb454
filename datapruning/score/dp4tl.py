"""DP4TL as pipeline metrics: target hits of each sample's source class (LM) or cluster (FM) (docs/methods.md#dp4tl)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..metrics.dp4tl import (feature_mapping_assign, feature_mapping_freq, label_mapping_freq,
                             lm_predictions_from_logits, train_linear_source_classifier, zero_shot_predictions)
from ..io.tables import read_embeddings
from .base import MetricOutput, ScoreInputs


def _lm_predictions(inp: ScoreInputs, route: str, target, logits, class_text, seed, epochs, max_samples):
    if route == "logits":
        if logits is None:
            raise ValueError("dp4tl_lm route=logits needs score.params.dp4tl_lm.logits (a .npy [n_target, C])")
        arr = np.load(logits, allow_pickle=False, mmap_mode="r")
        return lm_predictions_from_logits(arr), arr.shape[1]
    if target is None:
        raise ValueError(f"dp4tl_lm route={route} needs score.params.dp4tl_lm.target (target embeddings)")
    target_emb, _ = read_embeddings(target)
    if route == "zeroshot":
        if class_text is None:
            raise ValueError("dp4tl_lm route=zeroshot needs score.params.dp4tl_lm.class_text (a .npy [C, d])")
        text = np.load(class_text, allow_pickle=False)
        return zero_shot_predictions(target_emb, text), len(text)
    if route == "linear":
        clf = train_linear_source_classifier(inp.embeddings, inp.labels, seed, epochs, max_samples=max_samples)
        return clf.predict(target_emb), len(clf.bias)
    raise ValueError(f"dp4tl_lm route must be 'linear', 'logits' or 'zeroshot', got {route!r}")


def score_dp4tl_lm(inp: ScoreInputs, target: str | None = None, route: str = "linear", logits: str | None = None,
                   class_text: str | None = None, epochs: int = 10, max_samples: int | None = 200_000,
                   seed: int | None = None) -> MetricOutput:
    """Pipeline adapter, label mapping: score = target hit count of the sample's source class (larger =
    more target-relevant; unlabelled rows NaN). Classifier column / text row c is label code c."""
    if inp.labels is None:
        raise ValueError("dp4tl_lm needs source labels, but the input has none (use dp4tl_fm)")
    labels = np.asarray(inp.labels, dtype=np.int64)
    seed = inp.seed if seed is None else seed
    pred, n_classes = _lm_predictions(inp, route, target, logits, class_text, seed, epochs, max_samples)
    if labels.max(initial=-1) >= n_classes:
        raise ValueError(f"dp4tl_lm: the {route} classifier has {n_classes} classes but labels go to {labels.max()}")
    freq = label_mapping_freq(pred, n_classes)
    scores = np.where(labels >= 0, freq[np.maximum(labels, 0)], np.nan).astype(np.float64)
    info = {"route": route, "n_target": int(len(pred)), "freq": freq.tolist(),
            "zero_hit_groups": int((freq == 0).sum())}
    return MetricOutput(scores, info)


def score_dp4tl_fm(inp: ScoreInputs, target: str) -> MetricOutput:
    """Pipeline adapter, feature mapping: score = target hit count of the sample's source cluster
    (``inp.centroids`` are the source k-means; unassigned rows NaN)."""
    target_emb, _ = read_embeddings(target)
    freq = feature_mapping_freq(feature_mapping_assign(target_emb, inp.centroids), len(inp.centroids))
    cluster = np.asarray(inp.cluster, dtype=np.int64)
    scores = np.where(cluster >= 0, freq[np.maximum(cluster, 0)], np.nan).astype(np.float64)
    info = {"n_target": int(len(target_emb)), "freq": freq.tolist(), "zero_hit_groups": int((freq == 0).sum())}
    return MetricOutput(scores, info)
