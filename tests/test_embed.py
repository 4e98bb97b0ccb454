"""Encoders: the packaged MiniLM (real, offline), open_clip's offline failure, random weights refused,
fsspec URL inputs, and length-sorted text batching that gives rows back in file order."""
from __future__ import annotations

import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from datapruning.config import load_config
from datapruning.embed import build_encoder
from datapruning.embed import pipeline, stage
from datapruning.embed.encoders import Encoder
from datapruning.errors import EncoderError
from datapruning.runner import run_pipeline
from conftest import add_member, tiny_clip_overrides

WORDS = "the a cat sat on mat under old red house near river stone bridge".split()


def text_shard(path, n: int, seed: int = 0, bad=()) -> list[str]:
    """A tar of ``n`` texts of random lengths (1..60 words) in random order; ``bad`` keys get invalid UTF-8."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 61))) for _ in range(n)]
    with tarfile.open(path, "w") as tar:
        for i, text in enumerate(texts):
            add_member(tar, f"{i:05d}.txt", b"\xff\xfe" if i in bad else text.encode())
    return texts


def embed_shard(tmp_path, path, encoder, batch_size: int):
    cfg = load_config(None, ["embed.modality=text", f"embed.batch_size={batch_size}"])
    stage.embed_tar_shard(cfg, str(path), "00000", tmp_path, encoder)
    table = pq.read_table(tmp_path / "00000.parquet")
    return table["key"].to_pylist(), np.stack(table["embedding"].to_numpy(zero_copy_only=False))


def test_text_batches_are_length_sorted_and_rows_come_back_in_file_order(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "SORT_WINDOW_BATCHES", 3)  # 101 texts in windows of 12: several windows
    texts = text_shard(tmp_path / "in.tar", 101, bad={5, 77})
    batches = []

    def forward(batch):  # an embedding that names its text: its word count and a hash of its characters
        import torch

        batches.append([len(t) for t in batch])
        return torch.tensor([[len(t.split()), sum(map(ord, t)) % 997, 1.0] for t in batch])

    keys, emb = embed_shard(tmp_path, tmp_path / "in.tar", Encoder("fake", "text", str, forward, length=len), 4)
    good = [i for i in range(101) if i not in (5, 77)]
    assert keys == [f"{i:05d}" for i in good]  # file order, the bad samples skipped
    want = np.array([[len(texts[i].split()), sum(map(ord, texts[i])) % 997, 1.0] for i in good], np.float32)
    assert np.allclose(emb, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    assert all(b == sorted(b, reverse=True) for b in batches) and max(map(len, batches)) == 4
    assert sum(map(len, batches)) == 99 and len(batches) > 99 // 12  # several windows, each sorted on its own


def test_minilm_sorted_batches_match_file_order_batches(tmp_path):
    enc = build_encoder(load_config(None, ["embed.encoder=sentence_transformers", "embed.model=minilm",
                                           "embed.modality=text", "embed.device=cpu"]).embed)
    text_shard(tmp_path / "in.tar", 150, seed=1)
    keys, ours = embed_shard(tmp_path / "sorted", tmp_path / "in.tar", enc, 32)
    plain = Encoder(enc.name, "text", enc.prepare, enc.forward_fn, enc.device)  # no length: file-order batches
    keys_plain, theirs = embed_shard(tmp_path / "plain", tmp_path / "in.tar", plain, 32)
    assert keys == keys_plain == [f"{i:05d}" for i in range(150)]
    assert np.abs(ours - theirs).max() < 1e-5  # the same up to float noise (padding differs, masked out)


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


@pytest.mark.parametrize("cached", [False, True])
def test_an_unreachable_hub_fails_at_once_in_one_line(monkeypatch, tmp_path, cached):
    """The Hub out of reach (tests have no network; the probe is also stubbed so a networked CI never downloads):
    with no open_clip weights cached at all, the error comes before open_clip is imported; with some cached, the
    Hub client runs in offline mode (cache only, no retries) and its miss is the same one-line error."""
    from datapruning.embed import encoders
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    if cached:  # some other model's open_clip weights
        snap = tmp_path / "hub" / "models--laion--other" / "snapshots" / "abc"
        snap.mkdir(parents=True)
        (snap / "open_clip_model.safetensors").write_bytes(b"x")
    monkeypatch.setattr(encoders, "host_reachable", lambda host, timeout=0: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    imported, real = [], encoders.cache_only
    monkeypatch.setattr(encoders, "cache_only", lambda *a: imported.append(a) or real(*a))  # reached open_clip
    cfg = load_config(None, ["embed.model=ViT-B-32", "embed.pretrained=laion2b_s34b_b79k", "embed.device=cpu"])
    with pytest.raises(EncoderError, match="huggingface.co cannot be reached .* not in the local cache") as err:
        build_encoder(cfg.embed)
    assert "\n" not in str(err.value) and "embed.pretrained=/path/to/" in str(err.value)
    assert bool(imported) == cached and constants.HF_HUB_OFFLINE is False  # restored


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
