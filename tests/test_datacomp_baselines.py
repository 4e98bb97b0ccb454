"""DataComp's filtering baselines (configs/datacomp_*.yaml) on a synthetic pool with DataComp's column names.

Each run's kept uids are compared with a minimal reimplementation written from DataComp's description (the
paper's section 4.1 and its baselines/apply_filter.py): pandas and numpy on the metadata, nothing of ours but
the k-means centroids the image-based filter clusters with. The language identifier is py3langid in both.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datacomp_data import make_datacomp_pool, unit
from datapruning.config import load_config
from datapruning.run import RunLayout
from datapruning.runner import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
py3langid = pytest.importorskip("py3langid", reason="the caption rules need py3langid: pip install 'datapruning[lang]'")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("datacomp") / "metadata"
    cols = make_datacomp_pool(folder)
    df = pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))], ignore_index=True)
    return folder, df, cols


def run(config: str, folder: Path, out: Path, *overrides: str) -> set:
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", ["cluster.k=8", *overrides])
    stats = run_pipeline(cfg, str(folder), out)
    kept = pq.read_table(out / "kept.parquet")["uid"].to_pylist()
    assert stats["kept"] == len(kept)
    return set(kept)


# ---- the reimplementation, from DataComp's description ------------------------------------------------
def english(texts) -> np.ndarray:
    return np.array([py3langid.classify(t.replace("\n", " "))[0] == "en" for t in texts])


def clip_fraction(df: pd.DataFrame, key: str, fraction: float) -> np.ndarray:
    threshold = -np.sort(-df[key].values)[int(len(df) * fraction)]  # DataComp's get_threshold
    return (df[key] >= threshold).values


def basic(df: pd.DataFrame) -> np.ndarray:
    words = df.text.apply(lambda x: len(x.split()))
    chars = df.text.apply(len)
    short = np.minimum(df.original_width, df.original_height)
    aspect = np.maximum(df.original_width, df.original_height) / short
    return english(df.text) & ((words > 2) & (chars > 5) & (short >= 200) & (aspect <= 3.0)).values


def names_in(df: pd.DataFrame, names) -> np.ndarray:
    pattern = re.compile(r"\b(" + "|".join(re.escape(n.lower()) for n in sorted(names, key=len, reverse=True))
                         + r")\b")
    return df.text.apply(lambda x: pattern.search(x.lower()) is not None).values


def image_based(df: pd.DataFrame, l14_img: np.ndarray, centroids: np.ndarray, target: np.ndarray) -> np.ndarray:
    caption = english(df.text) & (df.text.apply(lambda x: len(x.split())) > 1).values & \
        (df.text.apply(len) > 5).values
    target_clusters = np.unique(np.argmax(target @ centroids.T, axis=1))
    pool_clusters = np.argmax(unit(l14_img) @ centroids.T, axis=1)
    return caption & np.isin(pool_clusters, target_clusters)


# ---- the tests ----------------------------------------------------------------------------------------
def test_clip_score_l14_top_30_percent(pool, tmp_path):
    folder, df, _ = pool
    kept = run("datacomp_clip_l14_30", folder, tmp_path / "run")
    assert kept == set(df.uid[clip_fraction(df, "clip_l14_similarity_score", 0.3)])
    assert len(kept) == int(0.3 * len(df)) + 1  # DataComp keeps the row at int(0.3 N) too


def test_clip_score_b32_threshold(pool, tmp_path):
    folder, df, _ = pool
    kept = run("datacomp_clip_b32_028", folder, tmp_path / "run")
    want = set(df.uid[df.clip_b32_similarity_score >= 0.28])
    assert kept == want and 0.2 * len(df) < len(want) < 0.8 * len(df)


def test_basic_filtering(pool, tmp_path):
    folder, df, _ = pool
    kept = run("datacomp_basic", folder, tmp_path / "run")
    want = set(df.uid[basic(df)])
    assert kept == want and 0.2 * len(df) < len(want) < 0.7 * len(df)


def test_text_based_filtering(pool, tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    folder, df, _ = pool
    kept = run("datacomp_text", folder, tmp_path / "run")
    want = set(df.uid[english(df.text) & names_in(df, IMAGENET_CLASSNAMES)])
    assert kept == want and 0 < len(want) < len(df)
    names = tmp_path / "names.txt"
    names.write_text("# two classes\nteapot\nmountain bike, bicycle\n")
    mine = run("datacomp_text", folder, tmp_path / "own", "score.params.text_match.names_from=null",
               f"score.params.text_match.names_file={names}")
    assert mine == set(df.uid[english(df.text) & names_in(df, ["teapot", "mountain bike", "bicycle"])])


@pytest.fixture(scope="module")
def target(pool, tmp_path_factory) -> Path:
    """Target image embeddings near two of the pool's six concepts (DataComp: ImageNet-1k's training images)."""
    _, _, cols = pool
    rows = np.flatnonzero(np.isin(cols["concept"], [0, 3]))[:40]
    path = tmp_path_factory.mktemp("target") / "target.npy"
    np.save(path, unit(cols["l14_img"][rows] + 0.05).astype(np.float32))
    return path


def test_image_based_filtering(pool, target, tmp_path):
    folder, df, cols = pool
    kept = run("datacomp_image", folder, tmp_path / "run", f"score.params.dp4tl_fm.target={target}")
    centroids = np.load(RunLayout(tmp_path / "run").centroids)
    l14 = np.concatenate([np.load(p)["l14_img"] for p in sorted(folder.glob("*.npz"))]).astype(np.float32)
    want = set(df.uid[image_based(df, l14, centroids, np.load(target))])
    assert kept == want and 0 < len(want) < 0.6 * len(df)


def test_image_based_intersect_clip_score(pool, target, tmp_path):
    folder, df, _ = pool
    kept = run("datacomp_image_clip", folder, tmp_path / "run", f"score.params.dp4tl_fm.target={target}")
    centroids = np.load(RunLayout(tmp_path / "run").centroids)
    l14 = np.concatenate([np.load(p)["l14_img"] for p in sorted(folder.glob("*.npz"))]).astype(np.float32)
    want = image_based(df, l14, centroids, np.load(target)) & clip_fraction(df, "clip_l14_similarity_score", 0.3)
    assert kept == set(df.uid[want]) and 0 < want.sum()


def test_export_datacomp_writes_the_kept_uids(pool, tmp_path):
    from datapruning.consumers.datacomp import DATACOMP_UID, export_datacomp_uids

    folder, df, _ = pool
    kept = run("datacomp_clip_l14_30", folder, tmp_path / "run")
    export_datacomp_uids(tmp_path / "run", tmp_path / "subset.npy")
    subset = np.load(tmp_path / "subset.npy")
    want = np.array(sorted((int(u[:16], 16), int(u[16:], 16)) for u in kept), DATACOMP_UID)  # DataComp's README
    assert subset.dtype == DATACOMP_UID and np.array_equal(subset, want)


def test_stored_clip_score_is_datacomps_and_equals_the_cosine(pool, tmp_path):
    folder, df, _ = pool
    cfg = load_config(ROOT / "configs" / "datacomp_clip_l14_30.yaml", ["cluster.k=8"])
    run_pipeline(cfg, str(folder), tmp_path / "run", stages=("embed",))
    emb = pq.read_table(tmp_path / "run" / "embeddings").to_pandas().set_index("uid").loc[df.uid]
    np.testing.assert_array_equal(emb.clip_score.to_numpy(), df.clip_l14_similarity_score.to_numpy())
    image, text = np.stack(emb.embedding.to_numpy()), np.stack(emb.text_embedding.to_numpy())
    cos = np.einsum("ij,ij->i", image, text)  # the stored (float16) embeddings, normalised on the way in
    assert np.abs(cos - emb.clip_score.to_numpy()).max() < 2e-3  # float16 precision
    assert list(emb.original_width) == list(df.original_width) and emb.text.tolist() == df.text.tolist()


def test_a_pool_with_a_null_score_or_caption(tmp_path):
    folder = tmp_path / "meta"
    make_datacomp_pool(folder, n_shards=1, per_shard=60)
    path = folder / "00000000.parquet"
    table = pq.read_table(path)
    scores = table["clip_l14_similarity_score"].to_pylist()
    texts = table["text"].to_pylist()
    scores[0], texts[1] = None, None
    table = table.set_column(table.column_names.index("clip_l14_similarity_score"), "clip_l14_similarity_score",
                             pa.array(scores, pa.float32()))
    pq.write_table(table.set_column(table.column_names.index("text"), "text", pa.array(texts)), path)
    run("datacomp_basic", folder, tmp_path / "basic")
    manifest = pq.read_table(tmp_path / "basic" / "manifest").to_pandas().set_index("uid")
    assert np.isnan(manifest.loc[table["uid"][1].as_py(), "score_caption"])  # no caption: unscored, not kept
    assert not manifest.loc[table["uid"][1].as_py(), "keep"]
    run("datacomp_clip_l14_30", folder, tmp_path / "clip")
    emb = pq.read_table(tmp_path / "clip" / "embeddings").to_pandas().set_index("uid")
    row = emb.loc[table["uid"][0].as_py()]  # a missing DataComp score: the cosine of the embeddings instead
    assert abs(row.clip_score - float(np.dot(row.embedding, row.text_embedding))) < 1e-6
