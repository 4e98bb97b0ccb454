"""Shared fixtures: tiny seeded shards, a tiny random-init open_clip config, precomputed inputs."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clipcfg") / "tiny-test-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def png_bytes(rng: np.random.Generator, base: np.ndarray) -> bytes:
    from PIL import Image

    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def make_png_shards(folder: Path, n_shards: int = 3, per_shard: int = 8, seed: int = 0, classes: int = 3) -> list[Path]:
    """Seeded 32x32 PNG samples in webdataset tars: ``.png``, ``.cls`` and a ``.txt`` caption.
    Each class has its own base colour pattern, so clusters exist."""
    rng = np.random.default_rng(seed)
    bases = rng.integers(0, 255, size=(classes, 32, 32, 3)).astype(np.float64)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                label = int(rng.integers(classes))
                key = f"s{s}-{i:04d}"
                add_member(tar, f"{key}.png", png_bytes(rng, bases[label]))
                add_member(tar, f"{key}.cls", str(label).encode())
                add_member(tar, f"{key}.txt", f"a picture of class {label}".encode())
        paths.append(path)
    return paths


def blobs(n: int, d: int, k: int, seed: int = 0, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors around k random unit centres; returns (x float32, true centre id)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(k, size=n)
    x = centres[truth] + spread * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), truth


def make_parquet_shards(folder: Path, n_shards: int = 3, per_shard: int = 40, d: int = 16, k: int = 4,
                        seed: int = 0) -> list[Path]:
    """Precomputed-embedding parquet per the DESIGN contract: uid, embedding, label, split."""
    x, truth = blobs(n_shards * per_shard, d, k, seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        rows = slice(s * per_shard, (s + 1) * per_shard)
        table = pa.table({
            "uid": [f"id-{i:06d}" for i in range(rows.start, rows.stop)],
            "embedding": pa.array(list(x[rows]), type=pa.list_(pa.float32())),
            "label": truth[rows].astype(np.int64),
            "split": ["train"] * per_shard,
        })
        path = folder / f"part-{s:03d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def make_clip_retrieval(folder: Path, parts: int = 2, per_part: int = 30, d: int = 16, seed: int = 1) -> Path:
    """A clip-retrieval output folder: img_emb/img_emb_{i}.npy plus metadata/metadata_{i}.parquet."""
    x, _ = blobs(parts * per_part, d, 3, seed)
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    for p in range(parts):
        rows = slice(p * per_part, (p + 1) * per_part)
        np.save(folder / "img_emb" / f"img_emb_{p}.npy", x[rows].astype(np.float16))
        pq.write_table(pa.table({"image_path": [f"img/{i:05d}.jpg" for i in range(rows.start, rows.stop)],
                                 "caption": [f"caption {i}" for i in range(rows.start, rows.stop)]}),
                       folder / "metadata" / f"metadata_{p}.parquet")
    return folder


@pytest.fixture
def png_shards(tmp_path) -> list[Path]:
    return make_png_shards(tmp_path / "shards")


@pytest.fixture
def parquet_shards(tmp_path) -> list[Path]:
    return make_parquet_shards(tmp_path / "emb")


def tiny_clip_overrides(cfg_path: Path) -> list[str]:
    return [f"embed.model_config={cfg_path}", "embed.pretrained=", "embed.allow_random_weights=true",
            "embed.batch_size=8", "embed.device=cpu", "cluster.k=3", "cluster.niter=10"]


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="more kill points and fuzz cases (reliability tests)")


@pytest.fixture
def long_mode(request) -> bool:
    return request.config.getoption("--long")


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_cuda(request):
    """Tests marked ``gpu`` run only where torch sees a CUDA device."""
    if request.node.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


def make_tiny_run(root: Path, clip_config: Path, **shard_kwargs) -> Path:
    """A finished run (all stages) over seeded PNG shards with the tiny random-init open_clip model."""
    from datapruning.config import load_config
    from datapruning.runner import run_pipeline

    make_png_shards(root / "shards", **shard_kwargs)
    run_pipeline(load_config(None, tiny_clip_overrides(clip_config)), str(root / "shards"), root / "run")
    return root / "run"


@pytest.fixture
def fresh(run, tmp_path) -> Path:
    """A copy of the module's ``run`` fixture without teacher outputs (each test computes its own)."""
    import shutil

    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("teacher"))
    return tmp_path / "run"


def make_download_folder(folder: Path, n_shards: int = 4, per_shard: int = 8, seed: int = 0,
                         empty_shard: int | None = None) -> dict[str, str]:
    """An img2dataset / DataComp download folder: ``{:08d}.tar`` (``.jpg``/``.png``, ``.txt``, ``.json`` with
    a 32-hex DataComp ``uid``) beside ``{:08d}.parquet``, ``{:08d}_stats.json`` and ``{:08d}.json``. Keys are
    the md5 of the url: 32 hex digits, but not the uid. Shard ``empty_shard`` has only undecodable images.
    Returns {manifest uid: DataComp uid} of every readable sample."""
    import hashlib

    rng = np.random.default_rng(seed)
    bases = rng.integers(0, 255, size=(3, 32, 32, 3)).astype(np.float64)
    folder.mkdir(parents=True, exist_ok=True)
    uids: dict[str, str] = {}
    for s in range(n_shards):
        name, rows = f"{s:08d}", []
        with tarfile.open(folder / f"{name}.tar", "w") as tar:
            for i in range(per_shard):
                url = f"https://example.com/{s}/{i}.jpg"
                key, uid = hashlib.md5(url.encode(), usedforsecurity=False).hexdigest(), "".join(rng.choice(list("0123456789abcdef"), 32))
                label = int(rng.integers(3))
                image = b"not an image" if s == empty_shard else png_bytes(rng, bases[label])
                meta = {"uid": uid, "url": url, "key": key, "caption": f"a photo of class {label}", "status": "success"}
                add_member(tar, f"{key}.{'jpg' if i % 2 else 'png'}", image)
                add_member(tar, f"{key}.txt", meta["caption"].encode())
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
                rows.append(meta)
                if s != empty_shard:
                    uids[f"{name}/{key}"] = uid
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
        (folder / f"{name}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        (folder / f"{name}.json").write_text(json.dumps({"shard": name}))
    return uids


def make_datacomp_metadata(folder: Path, n_shards: int = 2, per_shard: int = 30, seed: int = 2) -> dict[str, int]:
    """DataComp's published metadata: ``{:08d}.parquet`` (uid, url, text) plus a same-name ``.npz`` holding
    ``l14_img`` [n, 12], ``b32_img`` [n, 8] and the text embeddings (float16). Returns {uid: cluster truth}."""
    folder.mkdir(parents=True, exist_ok=True)
    truth_of: dict[str, int] = {}
    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        l14, truth = blobs(per_shard, 12, 3, seed + s)
        b32, _ = blobs(per_shard, 8, 3, seed + s + 100)
        uids = ["".join(rng.choice(list("0123456789abcdef"), 32)) for _ in range(per_shard)]
        truth_of.update(zip(uids, truth.tolist()))
        pq.write_table(pa.table({"uid": uids, "url": [f"https://example.com/{u}.jpg" for u in uids],
                                 "text": [f"caption {t}" for t in truth]}), folder / f"{s:08d}.parquet")
        np.savez(folder / f"{s:08d}.npz", l14_img=l14.astype(np.float16), b32_img=b32.astype(np.float16),
                 l14_txt=l14.astype(np.float16), b32_txt=b32.astype(np.float16))
    return truth_of
