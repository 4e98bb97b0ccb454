"""Transfer-aware pruning DP4TL (Zhang et al., NeurIPS 2023): label and feature mapping.

See docs/methods.md#dp4tl-transfer-aware-pruning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .el2n import torch_threads_for
from .exact import argmax_dots, unit_rows
from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

BLOCK_ELEMS = 1 << 23  # 8M float64 scores (64 MB) per block


def _blocked_argmax(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``argmax_c (x @ w.T + bias)`` per row: exact without a bias (``exact.argmax_dots``), else in float64 (a
    near-tie is not decided by the BLAS build's summation order), over row blocks of at most ``BLOCK_ELEMS``."""
    if bias is None:
        return argmax_dots(x, w)
    out = np.empty(len(x), dtype=np.int64)
    w = np.asarray(w, dtype=np.float64)
    step = max(1, BLOCK_ELEMS // max(1, len(w)))
    for r0 in range(0, len(x), step):
        s = np.asarray(x[r0:r0 + step], dtype=np.float64) @ w.T
        out[r0:r0 + step] = np.argmax(s + bias, axis=1)
    return out


def lm_predictions_from_logits(logits: np.ndarray) -> np.ndarray:
    """Source-class prediction per target sample: ``argmax`` of a source classifier's logits [n, C]."""
    if not hasattr(logits, "shape"):  # ndarray or np.memmap pass through without a copy
        logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ConfigError(f"dp4tl: logits must be [n_target, n_classes], got {logits.shape}")
    out = np.empty(len(logits), dtype=np.int64)
    step = max(1, BLOCK_ELEMS // logits.shape[1])
    for r0 in range(0, len(logits), step):
        out[r0:r0 + step] = np.argmax(logits[r0:r0 + step], axis=1)
    return out


@dataclass(frozen=True)
class LinearClassifier:
    """Multinomial logistic regression: ``predict`` is ``classes[argmax(x @ weight.T + bias)]``."""

    weight: np.ndarray  # float64 [C, d]
    bias: np.ndarray  # float64 [C]
    classes: np.ndarray  # int64 [C]: the label of each output

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[_blocked_argmax(x, self.weight, self.bias)]


def train_linear_source_classifier(source_emb: np.ndarray, source_labels: np.ndarray, seed: int = 0,
                                   epochs: int = 10, lr: float = 0.01, batch_size: int = 256,
                                   max_samples: int | None = 200_000, n_classes: int | None = None) -> LinearClassifier:
    """Train a linear source classifier with torch (CPU, float64, Adam, seeded init and batch order over the
    rows in the order given: the pipeline gives them in uid-hash order). Rows with a negative label are
    ignored. Its outputs are the codes 0..C-1 of the labels present, in sorted order (labels {3, 17, 999}
    make a 3-way head), or of ``range(n_classes)`` when given (labels must then be codes below it). At most
    ``max_samples`` rows (a seeded uniform sample by position) are used, which is plenty for a linear probe
    and bounds the cost at any N."""
    import torch

    labels = np.asarray(source_labels, dtype=np.int64)
    rows = np.flatnonzero(labels >= 0)
    if len(rows) == 0:
        raise InputError("dp4tl: the source has no labelled rows to train a classifier on")
    classes = np.arange(int(n_classes)) if n_classes else np.unique(labels[rows])
    if labels[rows].max() > classes[-1]:
        raise InputError(f"dp4tl: label code {labels[rows].max()} is not below n_classes={n_classes}")
    rng = np.random.default_rng(seed)
    if max_samples is not None and len(rows) > max_samples:
        rows = np.sort(rng.choice(rows, int(max_samples), replace=False))
    x = torch.from_numpy(np.ascontiguousarray(source_emb[rows], dtype=np.float32))
    y = torch.from_numpy(np.searchsorted(classes, labels[rows]))
    gen = torch.Generator().manual_seed(int(seed))
    model = torch.nn.Linear(x.shape[1], len(classes), dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=gen, dtype=torch.float64) * 0.01)
        model.bias.zero_()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch_threads_for(int(batch_size) * x.shape[1] * len(classes)):
        for _ in range(int(epochs)):
            for batch in torch.randperm(len(x), generator=gen).split(int(batch_size)):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch].double()), y[batch]).backward()
                opt.step()
    return LinearClassifier(model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy(), classes)


def zero_shot_predictions(target_emb: np.ndarray, class_text_emb: np.ndarray) -> np.ndarray:
    """Zero-shot route: ``argmax_c cos(target_i, text_c)``; text embeddings [C, d] come from elsewhere."""
    text = np.asarray(class_text_emb, dtype=np.float32)
    if not hasattr(target_emb, "shape"):
        target_emb = np.asarray(target_emb)
    if text.ndim != 2 or target_emb.ndim != 2 or text.shape[1] != target_emb.shape[1]:
        raise InputError(f"dp4tl: target {target_emb.shape} and class text {text.shape} embeddings do not match")
    return _blocked_argmax(target_emb, unit_rows(text))  # a row's own norm does not change its argmax


def feature_mapping_assign(target_emb: np.ndarray, source_centroids: np.ndarray) -> np.ndarray:
    """Nearest source centroid (cosine) per target sample, int64 [n_target]."""
    cents = np.asarray(source_centroids, dtype=np.float32)
    if not hasattr(target_emb, "shape"):
        target_emb = np.asarray(target_emb)
    if cents.ndim != 2 or target_emb.ndim != 2 or cents.shape[1] != target_emb.shape[1] or len(cents) == 0:
        raise InputError(f"dp4tl: target {target_emb.shape} and centroids {cents.shape} do not match")
    return _blocked_argmax(target_emb, unit_rows(cents))  # a row's own norm does not change its argmax


def label_mapping_freq(pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``freq[c]`` = number of target samples mapped to source class / cluster c, int64 [n_classes]."""
    pred = np.asarray(pred, dtype=np.int64)
    if len(pred) and (pred.min() < 0 or pred.max() >= n_classes):
        raise InputError(f"dp4tl: predictions outside [0, {n_classes})")
    return np.bincount(pred, minlength=int(n_classes))


feature_mapping_freq = label_mapping_freq  # hits per source cluster: the same count


GROUPINGS = {"label": "whole source classes", "cluster": "whole k-means clusters"}
NATIVE_GROUPING = {"dp4tl_lm": "label", "dp4tl_fm": "cluster"}  # the groups each DP4TL variant scores


def grouping_note(metric: str, by: str) -> tuple[str, bool]:
    """What a DP4TL group selection keeps, in words (for stats.json and the log), and whether ``by`` is not the
    grouping ``metric`` scores (label mapping scores classes, feature mapping scores clusters)."""
    native = NATIVE_GROUPING.get(metric)
    note = f"by: {by}: keeps {GROUPINGS[by]}, ranked by their best member's {metric} score"
    if native is not None and native != by:
        note += (f"; {metric} scores {GROUPINGS[native]}, so the published rule is by: {native} (set "
                 f"select.params.by={native}); see docs/methods.md#dp4tl-group-selection")
    return note, native is not None and native != by


def group_order(freq: np.ndarray) -> np.ndarray:
    """Group ids by descending hit count, ties by ascending id (zero-hit groups come last)."""
    freq = np.asarray(freq, dtype=np.float64)
    return np.lexsort((np.arange(len(freq)), -freq))


def top_k_groups(freq: np.ndarray, k: int | None = None, keep_fraction: float | None = None,
                 sample_budget: int | None = None, group_sizes: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Groups to keep, best first: give exactly one of ``k``, ``keep_fraction`` (of groups, rounded)
    or ``sample_budget`` (needs ``group_sizes``). Budget rule: walk the groups in order and keep
    each whole group while the running total stays <= budget; stop at the first group that would
    cross it (a group with fewer hits never displaces one with more). Returns ``(ids, info)``."""
    if sum(v is not None for v in (k, keep_fraction, sample_budget)) != 1:
        raise ConfigError("dp4tl: give exactly one of k, keep_fraction or sample_budget")
    order = group_order(freq)
    sizes = None if group_sizes is None else np.asarray(group_sizes, dtype=np.int64)
    if sizes is not None and len(sizes) != len(order):
        raise InputError(f"dp4tl: {len(sizes)} group sizes for {len(order)} groups")
    if keep_fraction is not None:
        if not 0.0 <= keep_fraction <= 1.0:
            raise ConfigError(f"dp4tl: keep fraction must be in [0, 1], got {keep_fraction}")
        k = int(round(keep_fraction * len(order)))
    if sample_budget is not None:
        if sizes is None:
            raise InputError("dp4tl: sample_budget needs group_sizes")
        within = np.cumsum(sizes[order]) <= int(sample_budget)
        k = int(np.argmin(within)) if not within.all() else len(order)
    if k < 0:
        raise ConfigError(f"dp4tl: k must be >= 0, got {k}")
    kept = order[: int(k)]
    info = {"groups_total": int(len(order)), "groups_kept": int(len(kept)), "kept_ids": kept.tolist(),
            "zero_hit_groups": int((np.asarray(freq) == 0).sum())}
    if sizes is not None:
        info["samples_kept"] = int(sizes[kept].sum())
    return kept, info
