"""Loaders over a real run: webdataset filter, IterableDataset in DataLoader workers, tables, DataComp uids."""
from __future__ import annotations

import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from datapruning.consumers import datacomp as dc
from datapruning.consumers import loaders as ld
from datapruning.config import load_config
from datapruning.runner import run_pipeline
from conftest import add_member, make_parquet_shards, png_bytes, tiny_clip_overrides

HEX = "0123456789abcdef"


def make_datacomp_like_shards(folder: Path, n_shards=3, per_shard=8, seed=0) -> dict[str, str]:
    """PNG samples with a DataComp-style .json holding a 128-bit hex uid; returns {manifest uid: hex uid}."""
    rng = np.random.default_rng(seed)
    bases = rng.integers(0, 255, size=(3, 32, 32, 3)).astype(np.float64)
    folder.mkdir(parents=True)
    uids = {}
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:08d}.tar", "w") as tar:
            for i in range(per_shard):
                key, label = f"{s:04d}{i:05d}", int(rng.integers(3))
                hexuid = "".join(rng.choice(list(HEX), 32))
                uids[f"{s:08d}/{key}"] = hexuid
                add_member(tar, f"{key}.jpg" if i % 2 else f"{key}.png", png_bytes(rng, bases[label]))
                add_member(tar, f"{key}.cls", str(label).encode())
                add_member(tar, f"{key}.json", json.dumps({"uid": hexuid, "caption": f"class {label}"}).encode())
    return uids


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_config):
    root = tmp_path_factory.mktemp("loaders")
    hexuids = make_datacomp_like_shards(root / "shards", n_shards=5, per_shard=8)
    cfg = load_config(None, tiny_clip_overrides(tiny_clip_config) + ["select.keep_fraction=0.4"])
    run_pipeline(cfg, str(root / "shards"), root / "run")
    return root / "run", hexuids


def kept_set(run_dir) -> set[str]:
    return set(pq.read_table(run_dir / "kept.parquet")["uid"].to_pylist())


def originals(run_dir) -> dict[str, bytes]:
    out = {}
    for s in json.loads((run_dir / "shards.json").read_text())["shards"]:
        with tarfile.open(s["path"]) as tar:
            for m in tar:
                out[f"{s['name']}/{m.name}"] = tar.extractfile(m).read()
    return out


def test_streaming_filter_yields_exactly_the_kept_samples(run):
    run_dir, _ = run
    urls = [s["path"] for s in json.loads((run_dir / "shards.json").read_text())["shards"]]
    kept, raw = kept_set(run_dir), originals(run_dir)
    assert len(kept) == 16
    got = list(wds.WebDataset(urls, shardshuffle=False).select(ld.KeptFilter(run_dir)))
    uids = [f"{Path(s['__url__']).stem}/{s['__key__']}" for s in got]
    assert sorted(uids) == sorted(kept) and len(uids) == len(set(uids))
    for s in got:  # the raw bytes of every member, no copy in between
        for ext in ("cls", "json", "png", "jpg"):
            if ext in s:
                assert s[ext] == raw[f"{Path(s['__url__']).stem}/{s['__key__']}.{ext}"]
    composed = wds.WebDataset(urls, shardshuffle=False).compose(ld.keep_only(run_dir))
    assert [f"{Path(s['__url__']).stem}/{s['__key__']}" for s in composed] == uids
    pipeline = wds.DataPipeline(wds.SimpleShardList(ld.kept_urls(run_dir)), wds.tarfile_to_samples(),
                                ld.keep_only(run_dir))
    assert sorted(f"{Path(s['__url__']).stem}/{s['__key__']}" for s in pipeline) == sorted(kept)


def test_streaming_filter_in_dataloader_workers_and_moved_shards(run, tmp_path):
    run_dir, _ = run
    urls = [s["path"] for s in json.loads((run_dir / "shards.json").read_text())["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).select(ld.KeptFilter(run_dir)).map(
        lambda s: f"{Path(s['__url__']).stem}/{s['__key__']}")
    got = [u for u in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
    assert sorted(got) == sorted(kept_set(run_dir))
    moved = tmp_path / "moved"
    moved.mkdir()
    for u in urls:
        (moved / Path(u).name).write_bytes(Path(u).read_bytes())
    keep = ld.KeptFilter(run_dir)
    assert keep.shard_of(str(moved / "00000002.tar")) == "00000002"  # found by file stem
    assert keep.shard_of(f"pipe:cat {moved / '00000003.tar'}") == "00000003"
    with pytest.raises(ValueError, match="not one of the shards of run"):
        keep.shard_of(str(moved / "other.tar"))
    assert pickle.loads(pickle.dumps(keep)).shard_of(urls[0]) == "00000000"  # noqa: S301 - our own object


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_dataloader_workers_no_duplicates_no_losses(run, workers):
    run_dir, _ = run
    ds = ld.ManifestDataset(run_dir, transform=lambda s: (s["uid"], s["label"], len(s.get("png", s.get("jpg")))))
    assert ds.num_samples == 16
    got = [u for batch in torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers) for u in batch[0]]
    assert Counter(got) == Counter(kept_set(run_dir))


def test_rank_and_shuffle_splitting(run, monkeypatch):
    run_dir, _ = run
    seen = []
    for rank in range(2):
        monkeypatch.setattr(ld, "_dist", lambda r=rank: (r, 2))
        ds = ld.ManifestDataset(run_dir, shuffle_shards=True, seed=1)
        ds.set_epoch(3)
        seen.append([s["uid"] for s in ds])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(kept_set(run_dir))
    monkeypatch.setattr(ld, "_dist", lambda: (0, 1))
    ds = ld.ManifestDataset(run_dir, shuffle_shards=True, seed=1)
    orders = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        orders.add(tuple(s["name"] for s in ds.my_shards()))
    assert len(orders) > 1


def test_selection_columns_and_labels(run):
    run_dir, _ = run
    manifest = pq.read_table(run_dir / "manifest")
    some = manifest["uid"].to_pylist()[::7]
    ds = ld.ManifestDataset(run_dir, select=some, columns=("label", "cluster"))
    rows = {s["uid"]: s for s in ds}
    assert sorted(rows) == sorted(some)
    by_uid = {u: (lab, c) for u, lab, c in zip(*(manifest[c].to_pylist() for c in ("uid", "label", "cluster")))}
    assert all((r["label"], r["cluster"]) == by_uid[u] for u, r in rows.items())
    assert all(r["cls"] == str(r["label"]).encode() for r in rows.values())
    assert len(list(ld.ManifestDataset(run_dir, select="all"))) == 40
    with pytest.raises(KeyError, match="not in the manifest"):
        ld.ManifestDataset(run_dir, select=["nope/x"])
    with pytest.raises(ValueError, match="select must be"):
        ld.ManifestDataset(run_dir, select="most")


def test_tables_pandas_and_hugging_face(run, tmp_path):
    run_dir, _ = run
    kept = kept_set(run_dir)
    table = ld.read_manifest(run_dir, kept_only=True, columns=["uid", "label", "keep"])
    assert set(table["uid"].to_pylist()) == kept and table.num_rows == 16
    df = ld.manifest_dataframe(run_dir)
    assert len(df) == 40 and df["keep"].sum() == 16 and {"cluster", "score_ssp"} <= set(df.columns)
    hf = ld.load_manifest_hf(run_dir, kept_only=True, columns=["uid", "label"], cache_dir=str(tmp_path / "hf"))
    assert len(hf) == 16 and set(hf["uid"]) == kept and hf.column_names == ["uid", "label"]
    full = ld.load_manifest_hf(run_dir, cache_dir=str(tmp_path / "hf"))
    assert len(full) == 40 and sum(full["keep"]) == 16
    emb = ld.load_embeddings(run_dir)
    stored = pq.read_table(run_dir / "embeddings")
    pos = {u: i for i, u in enumerate(stored["uid"].to_pylist())}
    matrix = np.stack(stored["embedding"].to_numpy(zero_copy_only=False))
    assert set(emb["uid"]) == kept and emb["embedding"].shape == (16, 16)
    np.testing.assert_array_equal(emb["embedding"], matrix[[pos[u] for u in emb["uid"]]])


def datacomp_lookup(subset: np.ndarray, hexuid: str) -> int:
    """What DataComp's resharder does per sample (resharder.py, copy_worker/process_example)."""
    u16 = np.dtype("u8,u8")
    key_u16 = np.array([divmod(int(hexuid, 16), 2**64)], u16)[0]
    return int(np.searchsorted(subset, key_u16, "right") - np.searchsorted(subset, key_u16, "left"))


def test_export_datacomp_from_sample_json(run, tmp_path):
    run_dir, hexuids = run
    info = dc.export_datacomp_uids(run_dir, tmp_path / "subset.npy")
    assert info == {"uids": 16, "source": "source_uid", "path": str(tmp_path / "subset.npy")}  # the .json uid
    subset = np.load(tmp_path / "subset.npy", mmap_mode="r")  # as DataComp's load_subset does
    assert subset.dtype == np.dtype("u8,u8") and subset.shape == (16,)
    pairs = subset.tolist()
    assert pairs == sorted(set(pairs))  # sorted by (high, low) word, unique: what searchsorted needs
    kept = kept_set(run_dir)
    for uid, hexuid in hexuids.items():
        assert datacomp_lookup(subset, hexuid) == (uid in kept)
    with pytest.raises(ValueError, match="uid source uid: .* not a 32-hex DataComp uid"):
        dc.export_datacomp_uids(run_dir, tmp_path / "x.npy", uid_source="uid")
    assert dc.export_datacomp_uids(run_dir, tmp_path / "j.npy", uid_source="json")["source"] == "source_uid"
    assert np.load(tmp_path / "j.npy").tolist() == pairs


def test_export_datacomp_from_metadata_uid_column(tmp_path):
    paths = make_parquet_shards(tmp_path / "emb", n_shards=2, per_shard=30)
    rng = np.random.default_rng(5)
    hexes = {}
    for p in paths:  # DataComp's metadata parquets key rows by a 32-hex uid column
        t = pq.read_table(p)
        new = ["".join(rng.choice(list(HEX.upper()), 32)) for _ in range(t.num_rows)]
        hexes.update(zip(new, t["uid"].to_pylist()))
        pq.write_table(t.set_column(0, "uid", pa.array(new)), p)
    hexes["0" * 32] = None
    run_pipeline(load_config(None, ["embed.encoder=precomputed", "cluster.k=4", "select.keep_fraction=0.5"]),
                 str(tmp_path / "emb"), tmp_path / "run")
    info = dc.export_datacomp_uids(tmp_path / "run", tmp_path / "s.npy")
    assert info["source"] == "source_uid" and info["uids"] == 30  # the metadata's uid column
    subset = np.load(tmp_path / "s.npy", allow_pickle=False)
    kept = kept_set(tmp_path / "run")
    assert sum(datacomp_lookup(subset, h) for h in hexes) == 30
    assert all(datacomp_lookup(subset, h) == (h in kept) for h in hexes)


def test_datacomp_uid_array_is_pure_and_strict():
    a = dc.datacomp_uid_array(["f" * 32, "0" * 31 + "1", "F" * 32, "1" + "0" * 31])
    assert a.tolist() == [(0, 1), (2**60, 0), (2**64 - 1, 2**64 - 1)]
    for bad in ["abc", "g" * 32, " " + "0" * 31, None]:
        with pytest.raises(ValueError, match="32-hex"):
            dc.datacomp_uid_array(["0" * 32, bad])
    assert dc.datacomp_uid_array([]).shape == (0,)


def test_decoded_samples_take_an_open_clip_transform(run):
    """decode='pil' hands each image to the transform open_clip builds; the default collate batches the rest."""
    import io

    import open_clip
    from PIL import Image

    run_dir, hexuids = run
    preprocess = open_clip.image_transform(24, is_train=False)
    loader = torch.utils.data.DataLoader(ld.ManifestDataset(run_dir, decode="pil", transform=preprocess),
                                         batch_size=4, num_workers=2)
    batches = list(loader)
    assert all(b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, 24, 24) for b in batches)
    assert {u for b in batches for u in b["uid"]} == kept_set(run_dir)
    assert all(t.startswith("class ") for b in batches for t in b["text"])  # the .json caption
    raw = next(iter(ld.ManifestDataset(run_dir)))
    ext = "png" if "png" in raw else "jpg"
    tensor = next(iter(ld.ManifestDataset(run_dir, decode="tensor")))
    assert tensor["uid"] == raw["uid"] and not any(isinstance(v, bytes) for v in tensor.values())
    expect = np.asarray(Image.open(io.BytesIO(raw[ext])).convert("RGB")).transpose(2, 0, 1)
    assert tensor["image"].dtype == torch.uint8 and np.array_equal(tensor["image"].numpy(), expect)
    with pytest.raises(ld.ConfigError, match="decode must be one of"):
        ld.ManifestDataset(run_dir, decode="jpeg")
