"""Input folders users bring: img2dataset's files output, NeMo Curator-style parquet, DataComp metadata without
its .npz, DataComp's resharder output, and no "left out" warning for files the run reads."""
from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import add_member, make_download_folder, png_bytes, tiny_clip_overrides
from datacomp_data import make_datacomp_pool
from datapruning.config import load_config
from datapruning.errors import ConfigError, InputError
from datapruning.runner import run_pipeline, run_stage


def files_folder(folder: Path, n_shards: int = 2, per_shard: int = 5) -> dict:
    """img2dataset --output_format files: ``{shard:05d}/{key}.jpg|.txt|.json`` beside ``{shard:05d}.parquet`` and
    ``{shard:05d}_stats.json``. Returns {key: DataComp-style uid}."""
    rng = np.random.default_rng(2)
    base = rng.integers(0, 255, size=(32, 32, 3)).astype(np.float64)
    uids = {}
    for s in range(n_shards):
        sub = folder / f"{s:05d}"
        sub.mkdir(parents=True)
        rows = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            uid = hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()
            (sub / f"{key}.png").write_bytes(png_bytes(rng, base))
            (sub / f"{key}.txt").write_text(f"caption {key}")
            meta = {"uid": uid, "key": key, "caption": f"caption {key}", "status": "success",
                    "original_width": 640 + i, "original_height": 480}
            (sub / f"{key}.json").write_text(json.dumps(meta))
            rows.append(meta)
            uids[key] = uid
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{s:05d}.parquet")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return uids


def test_img2dataset_files_output_is_read(tmp_path, tiny_clip_config, caplog):
    uids = files_folder(tmp_path / "files")
    with caplog.at_level(logging.WARNING, logger="datapruning.io.shards"):
        stats = run_pipeline(load_config(None, tiny_clip_overrides(tiny_clip_config) + ["embed.modality=pair"]),
                             str(tmp_path / "files"), tmp_path / "run")
    assert stats["samples_in"] == 10 and "left out" not in caplog.text
    manifest = pq.read_table(tmp_path / "run" / "manifest").to_pandas()
    assert dict(zip(manifest.key, manifest.source_uid)) == uids
    assert sorted(set(manifest.shard)) == ["00000", "00001"]
    emb = pq.read_table(tmp_path / "run" / "embeddings").to_pandas()
    assert emb.original_width.tolist() == [640 + i for i in range(5)] * 2  # from the .json, for image_size
    from datapruning.consumers.reshard import reshard  # the consumers read the folders as the tars they replace

    reshard(tmp_path / "run", tmp_path / "out", samples_per_shard=100, keys="original")
    import webdataset as wds

    out = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "out").glob("*.tar")), shardshuffle=False))
    assert sorted(s["__key__"] for s in out) == sorted(manifest.key[manifest.keep]) and out
    assert out[0]["png"] == (tmp_path / "files" / out[0]["__key__"][:5] / f"{out[0]['__key__']}.png").read_bytes()


def test_nemo_curator_parquet_names_the_keys_to_set(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    (tmp_path / "nemo").mkdir()
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(40)], "embeddings": list(x)}),
                   tmp_path / "nemo" / "part.parquet")
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=3"])
    with pytest.raises(InputError) as err:
        run_stage("embed", cfg, tmp_path / "run", str(tmp_path / "nemo"))
    assert "input.id_column" in str(err.value) and "input.embedding_column" in str(err.value)
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=3", "input.id_column=id",
                             "input.embedding_column=embeddings"])
    stats = run_pipeline(cfg, str(tmp_path / "nemo"), tmp_path / "run2")
    assert stats["samples_in"] == 40


def test_datacomp_metadata_without_npz_names_the_file(tmp_path):
    make_datacomp_pool(tmp_path / "meta", n_shards=1, per_shard=20, npz=False)
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=3"])
    with pytest.raises(InputError, match=r"00000000\.npz is missing"):
        run_stage("embed", cfg, tmp_path / "run", str(tmp_path / "meta"))


def test_datacomp_metadata_folder_warns_about_nothing_it_reads(tmp_path, caplog):
    make_datacomp_pool(tmp_path / "meta", n_shards=2, per_shard=20)
    (tmp_path / "meta" / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="datapruning.io.shards"):
        run_stage("embed", load_config(None, ["embed.encoder=precomputed"]), tmp_path / "run", str(tmp_path / "meta"))
    assert "left out 1 file(s) that are not shards: notes.txt" in caplog.text and ".npz" not in caplog.text


def test_datacomp_text_modality_needs_a_caption_array(tmp_path):
    make_datacomp_pool(tmp_path / "meta", n_shards=1, per_shard=20)
    cfg = load_config(None, ["embed.encoder=precomputed", "embed.modality=text"])
    with pytest.raises(ConfigError, match="set input.npz_key=l14_txt"):
        run_stage("embed", cfg, tmp_path / "run", str(tmp_path / "meta"))
    cfg = load_config(None, ["embed.encoder=precomputed", "embed.modality=text", "input.npz_key=l14_txt"])
    run_stage("embed", cfg, tmp_path / "run2", str(tmp_path / "meta"))
    stored = np.load(tmp_path / "meta" / "00000000.npz")["l14_txt"].astype(np.float32)
    got = np.stack(pq.read_table(tmp_path / "run2" / "embeddings")["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, stored / np.linalg.norm(stored, axis=1, keepdims=True), atol=1e-6)


def resharder_output(folder: Path, download: Path) -> dict:
    """What DataComp's resharder.py writes: ``{:08d}.tar`` with keys ``{uid}-{j}``, ``{:08d}_stats.json``,
    the subset file copied as ``sample_ids.npy`` and ``meta.json``."""
    uids = make_download_folder(download, n_shards=2, per_shard=6)
    folder.mkdir()
    rows = []
    for s, tar_path in enumerate(sorted(download.glob("*.tar"))):
        with tarfile.open(tar_path) as src, tarfile.open(folder / f"{s:08d}.tar", "w") as dst:
            members = [(m.name, src.extractfile(m).read()) for m in src.getmembers()]
            by_key: dict = {}
            for name, data in members:
                by_key.setdefault(name.split(".")[0], []).append((name.split(".", 1)[1], data))
            for parts in by_key.values():
                uid = json.loads(dict(parts)["json"])["uid"]
                rows.append(uid)
                for ext, data in parts:
                    add_member(dst, f"{uid}-0.{ext}", data)
        (folder / f"{s:08d}_stats.json").write_text(json.dumps({"count": 6, "successes": 6}))
    subset = np.array(sorted((int(u[:16], 16), int(u[16:], 16)) for u in rows), np.dtype("u8,u8"))
    np.save(folder / "sample_ids.npy", subset)
    (folder / "meta.json").write_text(json.dumps({"output_count": len(rows)}))
    return uids


def test_datacomp_resharder_output_is_an_input(tmp_path, tiny_clip_config, caplog):
    uids = resharder_output(tmp_path / "resharded", tmp_path / "download")
    with caplog.at_level(logging.WARNING, logger="datapruning.io.shards"):
        stats = run_pipeline(load_config(None, tiny_clip_overrides(tiny_clip_config)), str(tmp_path / "resharded"),
                             tmp_path / "run")
    assert stats["samples_in"] == 12 and "left out" not in caplog.text
    manifest = pq.read_table(tmp_path / "run" / "manifest").to_pandas()
    assert sorted(manifest.shard.unique()) == ["00000000", "00000001"]  # sample_ids.npy is no shard
    assert sorted(manifest.source_uid) == sorted(uids.values())


def test_a_loose_npy_is_named(tmp_path):
    (tmp_path / "emb").mkdir()
    np.save(tmp_path / "emb" / "vectors.npy", np.ones((3, 4), np.float32))
    with pytest.raises(InputError, match="vectors.npy has no vectors.parquet beside it"):
        run_stage("embed", load_config(None, ["embed.encoder=precomputed"]), tmp_path / "run", str(tmp_path / "emb"))
