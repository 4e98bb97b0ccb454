"""Random baseline: seeded uniform scores keyed by uid (``datapruning.hashing``), so row order does not matter.

See docs/methods.md#random-seeded-baseline.
"""
from __future__ import annotations

import numpy as np

from ..hashing import uid_hash


def random_scores(uids, seed: int) -> np.ndarray:
    """Uniform [0, 1) scores keyed by uid, so a sample's score does not depend on row order."""
    return (uid_hash(uids, seed) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
