"""A synthetic DataComp metadata pool with DataComp's real column names and .npz arrays, for the pair tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ENGLISH = ["a photo of a {} on the grass", "close up of a {} in the snow", "my new {} at home today",
           "the {} sleeping near a window", "{} for sale, good condition, free shipping"]
OTHER = ["ein schöner Hund am Strand im Sommer", "une photo de la tour Eiffel la nuit",
         "una casa grande con jardín y piscina", "il gatto dorme sul divano tutto il giorno",
         "zwei Katzen spielen im Garten mit einem Ball"]
SHORT = ["img", "dog", "DSC 0042", "ok ok"]
THINGS = ["golden retriever", "tabby cat", "school bus", "teapot", "laptop", "kayak", "mountain bike",
          "bicycle wheel", "coffee mug", "lawn", "sunset", "wedding dress", "castle", "pizza"]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_datacomp_pool(folder: Path, n_shards: int = 2, per_shard: int = 200, seed: int = 7,
                       npz: bool = True) -> dict:
    """``{:08d}.parquet`` (uid, url, text, original_width, original_height, clip_b32_similarity_score,
    clip_l14_similarity_score, sha256) plus ``{:08d}.npz`` (l14_img/l14_txt [n, 12], b32_img/b32_txt [n, 8],
    float16, as DataComp stores them). The similarity scores are the float32 cosines before the float16 cast.
    Returns the pool's columns and float32 embeddings, concatenated in shard order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    centres = unit(rng.normal(size=(6, 12)))
    allcols: dict = {}
    for s in range(n_shards):
        n = per_shard
        kind = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])
        texts = [ENGLISH[rng.integers(len(ENGLISH))].format(THINGS[rng.integers(len(THINGS))]) if k == 0
                 else OTHER[rng.integers(len(OTHER))] if k == 1 else SHORT[rng.integers(len(SHORT))] for k in kind]
        concept = rng.integers(len(centres), size=n)
        l14_img = unit(centres[concept] + 0.35 * rng.normal(size=(n, 12)))
        align = rng.uniform(0.0, 1.0, size=n)[:, None]  # how well each caption describes its image
        l14_txt = unit(align * l14_img + (1 - align) * unit(rng.normal(size=(n, 12))))
        b32_img = unit(rng.normal(size=(n, 8)))
        b32_txt = unit(rng.uniform(0.0, 0.6, size=(n, 1)) * b32_img + 0.5 * unit(rng.normal(size=(n, 8))))
        uids = ["".join(rng.choice(list("0123456789abcdef"), 32)) for _ in range(n)]
        cols = {
            "uid": uids, "url": [f"https://example.com/{u}.jpg" for u in uids], "text": texts,
            "original_width": rng.integers(60, 1200, size=n), "original_height": rng.integers(60, 1200, size=n),
            "clip_b32_similarity_score": np.einsum("ij,ij->i", b32_img, b32_txt).astype(np.float32),
            "clip_l14_similarity_score": np.einsum("ij,ij->i", l14_img, l14_txt).astype(np.float32),
            "sha256": [f"{i:064x}" for i in range(n)],
        }
        pq.write_table(pa.table(cols), folder / f"{s:08d}.parquet")
        if npz:
            np.savez(folder / f"{s:08d}.npz", l14_img=l14_img.astype(np.float16), l14_txt=l14_txt.astype(np.float16),
                     b32_img=b32_img.astype(np.float16), b32_txt=b32_txt.astype(np.float16))
        for k, v in {**cols, "l14_img": l14_img, "b32_img": b32_img, "concept": concept}.items():
            allcols.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in allcols.items()}
