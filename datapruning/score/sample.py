"""A bounded, seeded, label-stratified sample of a run's rows with their embeddings, in uid-hash order.

For the models the package fits (EL2N proxy heads, the DP4TL source classifier, the eval's probe). Rows are
picked by their seeded tie hash within each label and returned in tie-hash order, so neither the sample nor
the order a model trains in depends on row order, shard names or the number of shards.
"""
from __future__ import annotations

from functools import partial

import numpy as np

from ..cutoffs import find_cutoffs
from ..metrics.dbp import round_largest_remainder
from ..rows import add, concat


def _label_keys(block: dict) -> tuple:
    label = block["label"]
    return label, np.zeros(len(label), np.uint64), block["tie"], block["pos"].astype(np.uint64)


def _label_sizes(n_classes: int, block: dict) -> np.ndarray:
    label = block["label"]
    return np.bincount(label[label >= 0], minlength=n_classes)[:n_classes]


def _gather(cut, block: dict) -> tuple:
    kept = cut.keep(*_label_keys(block))
    return block["pos"][kept], block["label"][kept], block["embedding"][kept], block["tie"][kept]


def stratified_quotas(sizes: np.ndarray, max_rows: int) -> np.ndarray:
    """Rows per label, proportional to the label's size, summing to ``min(max_rows, total)`` exactly."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if total <= max_rows:
        return sizes
    return round_largest_remainder(sizes * (max_rows / total), max_rows, np.zeros_like(sizes), sizes)


def labelled_sample(rows, n_classes: int, max_rows: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pos, label, embedding) of at most ``max_rows`` labelled rows (every labelled row when None or
    when there are fewer), stratified by label, ordered by the seeded tie hash (then ``pos``, for two rows
    of one uid). ``rows`` must carry ``embedding``."""
    sizes = rows.reduce(partial(_label_sizes, n_classes), add)
    quotas = sizes if max_rows is None else stratified_quotas(sizes, int(max_rows))
    cut = find_cutoffs(rows, _label_keys, quotas, sizes)
    pos, label, emb, tie = rows.reduce(partial(_gather, cut), concat)
    order = np.lexsort((pos, tie))
    return pos[order], label[order], emb[order]
