"""Encoders: the packaged MiniLM (real, offline), open_clip's offline failure, random weights refused,
and fsspec URL inputs."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from datapruning.config import load_config
from datapruning.embed import build_encoder
from datapruning.errors import EncoderError
from datapruning.runner import run_pipeline
from conftest import tiny_clip_overrides


def test_minilm_text_encoder_is_real_and_normalised():
    enc = build_encoder(load_config(None, ["embed.encoder=sentence_transformers", "embed.model=minilm",
                                           "embed.modality=text", "embed.device=cpu"]).embed)
    x = enc.forward(["a photo of a cat", "a picture of a cat", "quarterly tax report"])
    assert x.shape == (3, 384) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.3  # a trained model: paraphrases are closer than unrelated text
    assert enc.name == "sentence_transformers:model"


def test_minilm_pipeline_on_captions(png_shards, tmp_path):
    cfg = load_config(None, ["embed.encoder=sentence_transformers", "embed.model=minilm", "embed.modality=text",
                             "embed.device=cpu", "cluster.k=3"])
    stats = run_pipeline(cfg, str(png_shards[0].parent), tmp_path / "run")
    assert stats["encoder"].startswith("sentence_transformers") and stats["samples_in"] == 24
    manifest = pq.read_table(tmp_path / "run" / "manifest").to_pandas()
    # captions are "a picture of class <label>": MiniLM puts each label's captions in one cluster
    assert manifest.groupby("label")["cluster"].nunique().max() == 1


def test_open_clip_without_network_says_how_to_use_local_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["embed.model=ViT-B-32", "embed.pretrained=laion2b_s34b_b79k", "embed.device=cpu"])
    with pytest.raises(EncoderError) as err:
        build_encoder(cfg.embed)
    message = str(err.value)
    assert "\n" not in message and "ViT-B-32" in message and "embed.pretrained=/path/to/" in message


def test_random_weights_are_refused_unless_asked(tiny_clip_config):
    with pytest.raises(EncoderError, match="random weights"):
        build_encoder(load_config(None, [f"embed.model_config={tiny_clip_config}", "embed.pretrained="]).embed)
    enc = build_encoder(load_config(None, tiny_clip_overrides(tiny_clip_config)).embed)
    assert "RANDOM-INIT" in enc.name


def test_fsspec_url_input(png_shards, tiny_clip_config, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in png_shards:
        fs.pipe(f"/dp-test/{path.name}", path.read_bytes())
    cfg = load_config(None, tiny_clip_overrides(tiny_clip_config))
    stats = run_pipeline(cfg, "memory://dp-test/{00000..00002}.tar", tmp_path / "run")
    assert stats["samples_in"] == 24
    run_pipeline(cfg, str(png_shards[0].parent), tmp_path / "local")
    assert (tmp_path / "run" / "kept.parquet").read_bytes() == (tmp_path / "local" / "kept.parquet").read_bytes()
