"""CLIP score as a pipeline metric: the cosine of each sample's image and caption embeddings.

See docs/methods.md#clip-score-and-datacomps-filtering-baselines. The embed stage stores it (``clip_score``)
for image-text pairs: computed from both towers (``embed.modality: pair``), or read from DataComp's metadata
(``clip_l14_similarity_score`` / ``clip_b32_similarity_score``). Larger is better aligned; keep the top with
``select.filters.clip_score`` or any selector with ``select.metric: clip_score`` and ``mode: hard``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Metric


@dataclass(frozen=True)
class ClipScoreParams:
    pass


def score(block: dict, state: dict, params: ClipScoreParams) -> np.ndarray:
    return np.asarray(block["clip_score"], dtype=np.float64)


CLIP_SCORE = Metric("clip_score", ClipScoreParams, score, reads=frozenset({"clip_score"}))
