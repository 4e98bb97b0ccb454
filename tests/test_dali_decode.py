"""The DALI decode step on DALI's CPU backend against the PIL path: pixels, row accounting, skip reasons.

DALI (``nvidia-dali-cuda130``, the ``[gpu]`` extra) runs its CPU backend without a GPU; where it is not
installed these tests skip, saying so. The GPU side (``device="mixed"``) is measured by scripts/gpu_check.sh.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import tiny_clip_overrides
from datapruning.config import InputConfig, load_config
from datapruning.embed.decoders import PilDecoder, choose_decoder, dali_available
from datapruning.embed.preprocess import spec_from_transform
from datapruning.runner import run_stage
from test_gpu_decode import make_jpeg_shards, open_clip_preprocess

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install "
                                "'datapruning[gpu]', nvidia-dali-cuda130; its CPU backend needs no GPU)")


def jpegs(rng, sizes, subsampling=-1):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_embed import jpeg_bytes

    return [jpeg_bytes(rng, int(h), int(w), subsampling) for h, w in sizes]


def batch_of(datas):
    return [((f"s/{i}", "s", str(i), None, None, None), {"jpg": d}) for i, d in enumerate(datas)]


@pytest.mark.parametrize("subsampling", [0, -1])  # 4:4:4 and PIL's default 4:2:0 chroma
def test_dali_pixels_within_two_levels_of_open_clip(subsampling):
    from datapruning.embed.dali_decode import DaliDecoder

    rng = np.random.default_rng(9)
    sizes = [(375, 500), (500, 375), (224, 224), (97, 301)] + [tuple(v) for v in rng.integers(120, 700, size=(4, 2))]
    datas = jpegs(rng, sizes, subsampling)
    pre = open_clip_preprocess()
    spec = spec_from_transform(pre)
    out = DaliDecoder(spec, "cpu", "image", InputConfig())(batch_of(datas))
    ref = torch.stack([pre(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas])
    levels = ((out.inputs - ref) * torch.tensor(spec.std).view(1, 3, 1, 1) * 255).abs()
    assert out.inputs.shape == ref.shape and out.reasons == [None] * len(datas)
    # DALI's cubic antialiased resize vs PIL's (CPU backend, DALI 2.4): within 1 uint8 level at the 99.9th
    # percentile of every image (issue 25's bar is 2), 4 at most (measured: 4 where 97 and 186 px sides enlarge)
    for img, size in zip(levels, sizes):
        assert float(torch.quantile(img.flatten(), 0.999)) <= 1.01 and float(img.mean()) < 0.25, size
        assert float(img.max()) <= 4.01, size


def test_dali_batch_with_a_broken_jpeg_falls_back_and_names_it(caplog):
    from datapruning.embed.dali_decode import DaliDecoder

    rng = np.random.default_rng(3)
    good = jpegs(rng, [(64, 80)] * 3)
    broken = good[0][: len(good[0]) // 3]  # the header reads, the scan data ends early
    junk = b"\xff\xd8\xff" + b"\x00" * 40  # a JPEG magic and nothing readable
    spec = spec_from_transform(open_clip_preprocess(32))
    with caplog.at_level("INFO", logger="datapruning.embed.dali_decode"):
        out = DaliDecoder(spec, "cpu", "image", InputConfig())(batch_of([good[0], broken, good[1], junk, good[2]]))
    ref = PilDecoder(open_clip_preprocess(32), "image", InputConfig())(batch_of([good[0], broken, good[1], junk, good[2]]))
    assert out.reasons == ref.reasons
    assert ref.reasons[3] == "corrupt_image" and len(ref.inputs) == 5 - sum(r is not None for r in ref.reasons)
    assert out.inputs.shape[0] == len(ref.inputs)
    assert "decoding it with the tensor step" in caplog.text  # the broken JPEG failed DALI's batch


def test_dali_embed_stage_equals_pil_path(tmp_path, tiny_clip_config):
    shards = make_jpeg_shards(tmp_path / "jpg")
    tables, markers = {}, {}
    for mode in ("pil", "dali"):
        cfg = load_config(None, tiny_clip_overrides(tiny_clip_config) + ["embed.batch_size=5",
                                                                         f"embed.image_decode={mode}"])
        run_stage("embed", cfg, tmp_path / mode, str(shards))
        tables[mode] = pq.read_table(tmp_path / mode / "embeddings")
        markers[mode] = [json.loads(p.read_text())["skipped"]
                         for p in sorted((tmp_path / mode / "_meta" / "embeddings").glob("_0*.done.json"))]
    dali, pil = tables["dali"], tables["pil"]
    assert dali.column_names == pil.column_names
    for col in ("uid", "shard", "key", "label"):
        assert dali[col].equals(pil[col]), col
    assert markers["dali"] == markers["pil"] == [{"duplicate_key": 1},
                                                 {"corrupt_image": 1, "duplicate_key": 1, "missing_image": 1}]
    a = np.stack(dali["embedding"].to_numpy(zero_copy_only=False))
    b = np.stack(pil["embedding"].to_numpy(zero_copy_only=False))
    assert np.einsum("ij,ij->i", a, b).min() > 0.999


def test_auto_picks_dali_only_for_cuda_encoders(tiny_clip_config):
    from datapruning.embed.dali_decode import DaliDecoder
    from datapruning.embed.stage import get_encoder

    cfg = load_config(None, tiny_clip_overrides(tiny_clip_config))
    encoder = get_encoder(cfg)
    assert isinstance(choose_decoder(cfg, encoder), PilDecoder)  # auto on a CPU encoder
    forced = load_config(None, tiny_clip_overrides(tiny_clip_config) + ["embed.image_decode=dali"])
    assert isinstance(choose_decoder(forced, encoder), DaliDecoder)

    class OnCuda:
        device, prepare, name = "cuda", encoder.prepare, encoder.name

    assert isinstance(choose_decoder(cfg, OnCuda()), DaliDecoder)


def test_dali_pair_keeps_captions_in_step(tmp_path):
    from datapruning.embed.dali_decode import DaliDecoder

    rng = np.random.default_rng(4)
    datas = jpegs(rng, [(40, 50)] * 3)
    batch = [((f"s/{i}", "s", str(i), None, None, None), sample) for i, sample in enumerate(
        [{"jpg": datas[0], "txt": b"a dog"}, {"jpg": datas[1]}, {"txt": b"no image"}, {"jpg": datas[2], "txt": b"a cat"}])]
    spec = spec_from_transform(open_clip_preprocess(32))
    out = DaliDecoder(spec, "cpu", "pair", InputConfig())(batch)
    assert out.reasons == [None, "missing_text", "missing_image", None]
    assert out.texts == ["a dog", "a cat"] and out.inputs.shape[0] == 2


@pytest.mark.gpu
def test_dali_on_cuda_matches_pil_rows_and_pixels(tmp_path, tiny_clip_config):
    """device="mixed": the hardware JPEG decoder and nvjpeg with fancy upsampling (measured by gpu_check.sh)."""
    from datapruning.embed.dali_decode import DaliDecoder

    rng = np.random.default_rng(11)
    datas = jpegs(rng, [(375, 500)] * 8)  # 4:2:0, PIL's default
    pre = open_clip_preprocess()
    spec = spec_from_transform(pre)
    out = DaliDecoder(spec, "cuda", "image", InputConfig())(batch_of(datas))
    assert out.inputs.is_cuda and out.ready is not None
    out.ready.synchronize()
    ref = torch.stack([pre(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas])
    levels = ((out.inputs.cpu() - ref) * torch.tensor(spec.std).view(1, 3, 1, 1) * 255).abs()
    assert float(torch.quantile(levels.flatten()[::5], 0.999)) <= 2.01  # issue 25's parity bar
    shards = make_jpeg_shards(tmp_path / "jpg")
    tables = {}
    for mode, dev in (("pil", "cpu"), ("dali", "cuda")):
        cfg = load_config(None, tiny_clip_overrides(tiny_clip_config) + ["embed.batch_size=5", f"embed.device={dev}",
                                                                         f"embed.image_decode={mode}"])
        run_stage("embed", cfg, tmp_path / mode, str(shards))
        tables[mode] = pq.read_table(tmp_path / mode / "embeddings")
    assert tables["dali"]["uid"].equals(tables["pil"]["uid"])
    a, b = (np.stack(t["embedding"].to_numpy(zero_copy_only=False)) for t in (tables["dali"], tables["pil"]))
    assert np.einsum("ij,ij->i", a, b).min() > 0.98  # bf16 autocast and nvjpeg vs fp32 and PIL
