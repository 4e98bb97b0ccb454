"""docs/consumers.md's client examples, run as written from another directory, plus each client's own reader."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from datapruning.cli import main
from datapruning.consumers import datacomp as dc
from datapruning.consumers import loaders as ld
from datapruning.consumers.reshard import reshard
from datapruning.errors import ConfigError, InputError
from conftest import (blobs, make_clip_retrieval, make_datacomp_metadata, make_download_folder, make_tiny_run,
                      tiny_clip_overrides)

DOC = (Path(__file__).resolve().parent.parent / "docs" / "consumers.md").read_text()


def doc_block(lang: str, marker: str) -> str:
    found = [b for b in re.findall(rf"```{lang}\n(.*?)```", DOC, re.S) if f"# client: {marker}" in b]
    assert len(found) == 1, f"docs/consumers.md: expected one {lang} block for client {marker!r}, found {len(found)}"
    return found[0]


def doc_command(marker: str) -> list[str]:
    """The ``datapruning ...`` line that follows ``# client: marker`` in its bash block, as argv."""
    lines = doc_block("bash", marker).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"# client: {marker}"))
    return shlex.split(lines[start + 1])[1:]


def run_doc(marker: str, namespace: dict | None = None) -> dict:
    namespace = {} if namespace is None else namespace
    exec(compile(doc_block("python", marker), "docs/consumers.md", "exec"), namespace)  # noqa: S102 - our own doc
    return namespace


def with_overrides(argv: list[str], overrides: list[str]) -> list[str]:
    return argv + [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_clip_config):
    """The img2dataset example run in ``made/`` (an empty shard included); ``elsewhere/runs/laion/run`` links
    to it, so the examples run from another directory with the doc's relative paths."""
    made, elsewhere = tmp_path_factory.mktemp("made"), tmp_path_factory.mktemp("elsewhere")
    uids = make_download_folder(made / "laion-download", n_shards=4, per_shard=8, empty_shard=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(made)
        assert main(with_overrides(doc_command("img2dataset"), tiny_clip_overrides(tiny_clip_config))) == 0
    (elsewhere / "runs" / "laion").mkdir(parents=True)
    (elsewhere / "runs" / "laion" / "run").symlink_to(made / "runs" / "laion" / "run")
    run = made / "runs" / "laion" / "run"
    return SimpleNamespace(made=made, elsewhere=elsewhere, run=run, uids=uids,
                           kept=set(pq.read_table(run / "kept.parquet")["uid"].to_pylist()))


def test_download_folder_is_read_as_its_tars(site):
    shards = json.loads((site.run / "shards.json").read_text())["shards"]
    assert [s["name"] for s in shards] == ["00000000", "00000001", "00000002", "00000003"]
    assert all(s["format"] == "webdataset" and Path(s["path"]).is_absolute() and s["path"].endswith(".tar")
               for s in shards)
    stats = json.loads((site.run / "stats.json").read_text())
    assert stats["samples_in"] == 24 and stats["skipped"] == {"corrupt_image": 8} and stats["kept"] == len(site.kept)
    man = ld.read_manifest(site.run, columns=["uid", "key", "source_uid"])
    assert dict(zip(man["uid"].to_pylist(), man["source_uid"].to_pylist())) == site.uids
    assert all(len(k) == 32 and f"00000000/{k}" not in site.uids.values() for k in man["key"].to_pylist())


def test_data_folders_hold_only_data(site):
    assert {p.suffix for p in (site.run / "manifest").iterdir()} == {".parquet"}
    assert (site.run / "_meta" / "manifest" / "_00000000.done.json").exists()
    assert pds.dataset(str(site.run / "manifest"), format="parquet").count_rows() == 24
    empty = pq.ParquetFile(site.run / "manifest" / "00000002.parquet")
    assert empty.metadata.num_rows == 0 and empty.metadata.num_row_groups == 0  # HF sizes batches by row group 0


def test_webdataset_and_open_clip_from_another_directory(site, monkeypatch):
    monkeypatch.chdir(site.elsewhere)
    ns = run_doc("webdataset")
    assert sorted(s["__key__"] for s in ns["resharded"]) == sorted(site.kept)
    assert sorted(f"{s['__url__'].split('/')[-1][:-4]}/{s['__key__']}" for s in ns["filtered"]) == sorted(site.kept)
    pytest.importorskip("open_clip_train")
    run_doc("open_clip", ns)
    assert (ns["num_samples"], ns["num_shards"]) == (len(site.kept), 1)


def open_clip_pipeline(pattern: str, batch_size: int = 4):
    """A webdataset pipeline built the way open_clip's get_wds_dataset builds it (eval branch: no shuffle)."""
    import braceexpand

    def has_caption_and_image(sample):
        return "txt" in sample and any(k in sample for k in ("png", "jpg", "jpeg", "webp"))

    urls = list(braceexpand.braceexpand(pattern))
    return wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(),
                            wds.select(has_caption_and_image), wds.decode("pilrgb"),
                            wds.rename(image="jpg;png;jpeg;webp", text="txt"), wds.to_tuple("image", "text"),
                            wds.batched(batch_size, partial=True))


def test_resharded_folder_feeds_open_clip(site, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    info = reshard(site.elsewhere / "runs" / "laion" / "run", "kept5", samples_per_shard=5)
    names = [f"{i:08d}.tar" for i in range(-(-len(site.kept) // 5))]
    assert json.loads((tmp_path / "kept5" / "sizes.json").read_text()) == {
        n: min(5, len(site.kept) - 5 * i) for i, n in enumerate(names)}
    assert Path(info["pattern"]).is_absolute() and not (tmp_path / "kept5" / "_meta").exists()
    monkeypatch.chdir(site.elsewhere)
    assert sum(len(texts) for _, texts in open_clip_pipeline(info["pattern"])) == len(site.kept)
    data = pytest.importorskip("open_clip_train.data")
    assert data.get_dataset_size(info["pattern"]) == (len(site.kept), len(names))
    args = SimpleNamespace(train_data=None, val_data=info["pattern"], val_num_samples=None, batch_size=4,
                           workers=0, world_size=1, dataset_resampled=False, train_data_upsampling_factors=None)
    loader = data.get_wds_dataset(args, lambda im: np.asarray(im), is_train=False, tokenizer=lambda t: [t]).dataloader
    assert sum(len(texts) for _, texts in loader) == len(site.kept)


def resharder_keeps(subset: np.ndarray, hexuid: str) -> bool:
    """DataComp resharder.py's per-sample test: the uid's two 64-bit halves, binary-searched in the subset."""
    key = np.array([(int(hexuid[:16], 16), int(hexuid[16:32], 16))], np.dtype("u8,u8"))[0]
    return bool(np.searchsorted(subset, key, "right") - np.searchsorted(subset, key, "left"))


def test_datacomp_round_trip(site, monkeypatch, capsys):
    monkeypatch.chdir(site.elsewhere)
    ns = run_doc("datacomp resharder")
    subset = ns["subset"]
    assert subset.dtype == np.dtype("u8,u8") and subset.tolist() == sorted(set(subset.tolist()))
    selected = set()
    for tar_path in sorted((site.made / "laion-download").glob("*.tar")):  # the pool, as the resharder reads it
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json") and resharder_keeps(subset, json.load(tar.extractfile(m))["uid"]):
                    selected.add(f"{tar_path.stem}/{m.name[:-5]}")
    assert selected == site.kept and len(selected) > 0
    assert main(["export-datacomp", "runs/laion/run", "cli.npy"]) == 0
    assert "(from source_uid)" in capsys.readouterr().out
    assert np.load("cli.npy").tolist() == subset.tolist()


def test_hugging_face_loads_files_and_folder(site, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.chdir(site.elsewhere)
    ns = run_doc("hugging face parquet")
    assert len(ns["manifest"]) == 24 and sum(ns["manifest"]["keep"]) == len(site.kept)
    assert set(ns["kept"]["uid"]) == site.kept
    files = sorted(str(p) for p in Path("runs/laion/run/manifest").glob("*.parquet"))
    hf = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "c2"))
    assert len(hf) == 24 and "source_uid" in hf.column_names
    assert len(ld.load_manifest_hf("runs/laion/run", kept_only=True, cache_dir=str(tmp_path / "c3"))) == len(site.kept)


def test_hugging_face_webdataset_reads_resharded_tars(tmp_path, monkeypatch, tiny_clip_config):
    """On tars whose samples all have the same members (HF infers one schema; the site mixes .jpg and .png)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    run = make_tiny_run(tmp_path / "made", tiny_clip_config, n_shards=2, per_shard=8)
    monkeypatch.chdir(tmp_path)
    reshard(run, "runs/laion/kept", samples_per_shard=3)  # as the webdataset example does
    hf = run_doc("hugging face webdataset")["resharded_hf"]
    kept = pq.read_table(run / "kept.parquet")["uid"].to_pylist()
    assert sorted(hf["__key__"]) == sorted(kept) and {"png", "cls", "txt"} <= set(hf.column_names)


def test_duckdb(site, monkeypatch):
    pytest.importorskip("duckdb")
    monkeypatch.chdir(site.elsewhere)
    per_cluster = run_doc("duckdb")["per_cluster"]
    assert sum(n for _, n in per_cluster) == len(site.kept)


def test_missing_input_file_is_named(site, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(site.run, run)
    shards = json.loads((run / "shards.json").read_text())
    gone = next(s for s in shards["shards"] if ld.kept_keys(run, s["name"]))
    gone["path"] = str(tmp_path / "moved" / "00000000.tar")
    (run / "shards.json").write_text(json.dumps(shards))
    monkeypatch.chdir(tmp_path)
    message = rf"shard {gone['name']}: input file .*moved/00000000.tar is missing"
    with pytest.raises(InputError, match=message):
        reshard(run, tmp_path / "out", samples_per_shard=5)
    with pytest.raises(InputError, match=message):
        ld.kept_urls(run)
    with pytest.raises(InputError, match=message):
        list(ld.ManifestDataset(run))


def test_auto_never_guesses_from_key_shape(tmp_path, monkeypatch):
    import hashlib

    x, _ = blobs(40, 8, 3, seed=3)
    ids = [hashlib.md5(str(i).encode(), usedforsecurity=False).hexdigest() for i in range(40)]  # 32-hex, not uids
    (tmp_path / "emb").mkdir()
    pq.write_table(pa.table({"id": ids, "embedding": pa.array(list(x), pa.list_(pa.float32()))}),
                   tmp_path / "emb" / "part-0.parquet")
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--input", "emb", "--output", "run"]
    assert main(with_overrides(argv, ["embed.encoder=precomputed", "input.id_column=id", "cluster.k=3"])) == 0
    with pytest.raises(ValueError, match="no source_uid column.*--uid-source json.*uid.*key"):
        dc.export_datacomp_uids("run", "s.npy")
    assert dc.export_datacomp_uids("run", "s.npy", uid_source="uid")["source"] == "uid"  # asked for: fine


def test_datacomp_metadata_npz_input(tmp_path, monkeypatch):
    truth = make_datacomp_metadata(tmp_path / "datacomp-metadata")
    monkeypatch.chdir(tmp_path)
    argv = doc_command("datacomp metadata")
    assert main(with_overrides(argv, ["cluster.k=3"])) == 0
    shards = json.loads(Path("runs/pool/shards.json").read_text())["shards"]
    assert [(s["name"], s["format"]) for s in shards] == [("00000000", "datacomp"), ("00000001", "datacomp")]
    emb = pq.read_table("runs/pool/embeddings/00000000.parquet")
    assert emb["embedding"].combine_chunks().value_lengths()[0].as_py() == 8  # b32_img, as asked
    assert dc.export_datacomp_uids("runs/pool", tmp_path / "s.npy")["source"] == "source_uid"
    subset = np.load(tmp_path / "s.npy")
    kept = set(pq.read_table("runs/pool/kept.parquet")["uid"].to_pylist())
    assert {u for u in truth if resharder_keeps(subset, u)} == kept
    default = [a for a in argv if a != "input.npz_key=b32_img"][:-1] + ["--output", "runs/l14"]
    assert main(with_overrides(default, ["cluster.k=3"])) == 0
    emb = pq.read_table("runs/l14/embeddings/00000000.parquet")
    assert emb["embedding"].combine_chunks().value_lengths()[0].as_py() == 12  # l14_img, the default
    from datapruning.config import load_config

    with pytest.raises(ConfigError, match="input.npz_key"):
        load_config(None, ["input.npz_key=l14"])


def test_clip_retrieval_folder_from_another_directory(tmp_path, monkeypatch):
    make_clip_retrieval(tmp_path / "clip-out", parts=2, per_part=30)
    monkeypatch.chdir(tmp_path)
    assert main(with_overrides(doc_command("clip-retrieval"), ["cluster.k=3"])) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    table = ld.read_manifest(tmp_path / "runs" / "cr", columns=["uid", "keep"])
    assert table.num_rows == 60 and table["uid"][0].as_py() == "img/00000.jpg"
    assert all(Path(s["path"]).is_absolute() for s in ld.run_shards(tmp_path / "runs" / "cr"))
