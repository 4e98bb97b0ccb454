"""SSP as a pipeline metric: the cosine distance to the cluster centroid, or to the class prototype.

See docs/methods.md#ssp-self-supervised-prototypicality. With ``prototypes: labels`` a labelled row's distance
is to its class prototype (the normalised mean embedding of its class) and an unlabelled row's to its cluster
centroid. The two distances are on different scales, so each row scores its rank within its own source
(labelled or unlabelled), read from a fine histogram of that source's distances built in ``prepare``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from ..metrics.ssp import distance_histogram, prototypes_from_sums, prototypicality, within_source_cdf
from ..rows import add
from ..metrics.fixed import fixed_sum
from .base import Metric
from ..params import setting
from ..errors import InputError


@dataclass(frozen=True)
class SSPParams:
    prototypes: str = setting("clusters", choices=("clusters", "labels"))  # self-supervised | class means


def _class_sums(n_classes: int, block: dict):
    known = block["label"] >= 0
    return (fixed_sum(block["embedding"][known], block["label"][known], n_classes),
            np.bincount(block["label"][known], minlength=n_classes))


def prepare(ctx, params: SSPParams) -> dict:
    if params.prototypes == "clusters":
        return {}
    if ctx.n_classes == 0:
        raise InputError("score.params.ssp.prototypes=labels needs labels, but the input has none")
    sums, counts = ctx.embedding_rows.reduce(partial(_class_sums, ctx.n_classes), add)
    state = {"prototypes": prototypes_from_sums(sums), "counts": counts}
    state["hist"] = ctx.embedding_rows.reduce(partial(_histogram, state), add)
    return state


def raw_distances(block: dict, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance, source): class-prototype distance for labelled rows (source 0), cluster distance otherwise (1)."""
    out = block["cos_dist"].astype(np.float64)
    known = block["label"] >= 0
    rows = np.flatnonzero(known)
    out[rows] = prototypicality(block["embedding"][rows], prototypes, block["label"][rows])
    return out, (~known).astype(np.int64)


def _histogram(state: dict, block: dict) -> np.ndarray:
    return distance_histogram(*raw_distances(block, state["prototypes"]))


def score(block: dict, state: dict, params: SSPParams) -> np.ndarray:
    if params.prototypes == "clusters":
        return block["cos_dist"].astype(np.float64)
    values, source = raw_distances(block, state["prototypes"])
    return within_source_cdf(values, source, state["hist"])


def summarize(rows, params: SSPParams, state: dict) -> dict:
    info = {"prototypes": params.prototypes}
    if params.prototypes == "labels":
        info["classes"] = int((state["counts"] > 0).sum())
        info["rows_by_source"] = {"labelled": int(state["hist"][0].sum()), "unlabelled": int(state["hist"][1].sum())}
        info["normalised"] = "rank within source (labelled: class prototype, unlabelled: cluster centroid)"
    return info


def reads(params: SSPParams) -> frozenset:
    return frozenset({"embedding", "label"}) if params.prototypes == "labels" else frozenset()


SSP = Metric("ssp", SSPParams, score, reads=reads, prepare=prepare, summarize=summarize)
