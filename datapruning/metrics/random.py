"""Random baseline: seeded uniform scores, a first-class metric.

See docs/methods.md#random-seeded-baseline.
"""
from __future__ import annotations

import hashlib

import numpy as np



def random_scores(uids, seed: int) -> np.ndarray:
    """Uniform [0, 1) scores keyed by uid, so a sample's score does not depend on row order."""
    out = np.empty(len(uids), dtype=np.float64)
    salt = str(int(seed)).encode()
    for i, uid in enumerate(uids):
        digest = hashlib.blake2b(str(uid).encode(), digest_size=8, key=salt).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out
