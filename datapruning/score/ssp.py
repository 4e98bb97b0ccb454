"""SSP as a pipeline metric: distance to the cluster centroid, or to the class prototype.

With ``prototypes: labels`` the prototype is the normalised mean embedding of the sample's class (exact
fixed-point sums); unlabelled rows keep the cluster distance. See docs/methods.md#ssp-self-supervised-prototypicality.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from ..metrics.ssp import prototypicality
from ..rows import add
from ..metrics.fixed import fixed_sum
from .base import Metric, choice


@dataclass(frozen=True)
class SSPParams:
    prototypes: str = "clusters"  # clusters (self-supervised) | labels (class means)

    def check(self):
        choice("score.params.ssp.prototypes", self.prototypes, ("clusters", "labels"))


def _class_sums(n_classes: int, block: dict):
    known = block["label"] >= 0
    return (fixed_sum(block["embedding"][known], block["label"][known], n_classes),
            np.bincount(block["label"][known], minlength=n_classes))


def prepare(ctx, params: SSPParams) -> dict:
    if params.prototypes == "clusters":
        return {}
    if ctx.n_classes == 0:
        raise ValueError("score.params.ssp.prototypes=labels needs labels, but the input has none")
    sums, counts = ctx.embedding_rows.reduce(partial(_class_sums, ctx.n_classes), add)
    protos = sums.astype(np.float64)
    norms = np.linalg.norm(protos, axis=1, keepdims=True)
    return {"prototypes": (protos / np.where(norms > 0, norms, 1.0)).astype(np.float32), "counts": counts}


def score(block: dict, state: dict, params: SSPParams) -> np.ndarray:
    out = block["cos_dist"].astype(np.float64)
    if params.prototypes == "labels":
        known = np.flatnonzero(block["label"] >= 0)
        out[known] = prototypicality(block["embedding"][known], state["prototypes"], block["label"][known])
    return out


def summarize(rows, params: SSPParams, state: dict) -> dict:
    info = {"prototypes": params.prototypes}
    if params.prototypes == "labels":
        info["classes"] = int((state["counts"] > 0).sum())
    return info


def reads(params: SSPParams) -> frozenset:
    return frozenset({"embedding", "label"}) if params.prototypes == "labels" else frozenset()


SSP = Metric("ssp", SSPParams, score, reads=reads, prepare=prepare, summarize=summarize)
