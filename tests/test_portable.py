"""Every recorded path resolves from anywhere: each consumer, and ``run recommended.yaml``, work from another
directory after the working directory the run was made in has been renamed (relative paths with ``..`` given)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import braceexpand
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from datapruning.cli import main
from datapruning.consumers import loaders as ld
from datapruning.io.files import read_json
from datapruning.run import RunLayout
from conftest import make_png_shards

FLAGS = ["embed.pretrained=", "embed.allow_random_weights=true", "embed.batch_size=8", "embed.device=cpu",
         "cluster.k=3", "cluster.niter=10", "score.metrics=[ssp,random,dp4tl_fm]"]


def sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def moved(tmp_path_factory, tiny_clip_config):
    """Inputs in data/, a run, its eval and a reshard made from work/ with '../' paths; then work/ is renamed."""
    root = tmp_path_factory.mktemp("portable")
    make_png_shards(root / "data" / "shards", n_shards=3, per_shard=16)
    shutil.copy(tiny_clip_config, root / "data" / "tiny.json")
    target = np.random.default_rng(1).normal(size=(20, 16)).astype(np.float32)
    pq.write_table(pa.table({"embedding": pa.array(list(target), pa.list_(pa.float32()))}),
                   root / "data" / "target.parquet")
    (root / "work").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "work")
        assert main(["run", "--input", "../data/shards", "--output", "../runs/x", *sets(FLAGS),
                     *sets(["embed.model_config=../data/tiny.json", "score.params.dp4tl_fm.target=../data/"
                            "target.parquet"])]) == 0
        assert main(["eval", "../runs/x", "--fractions", "0.5,1", "--seeds", "1", "--kd", "none", "--tolerance", "0.99",
                     "--max-iter", "30"]) == 0
        assert main(["reshard", "../runs/x", "--output", "../kept", "-n", "5"]) == 0
    os.rename(root / "work", root / "work-renamed")
    (root / "other").mkdir()
    return SimpleNamespace(root=root, run=root / "runs" / "x", kept=root / "kept", other=root / "other")


def recorded_paths(obj) -> list[str]:
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in recorded_paths(v)]
    if isinstance(obj, list):
        return [p for v in obj for p in recorded_paths(v)]
    return [obj] if isinstance(obj, str) and "/" in obj and "://" not in obj and not any(c.isspace() for c in obj) else []


def test_every_recorded_path_is_absolute_normalised_and_there(moved):
    layout = RunLayout(moved.run)
    text = layout.recommended.read_text()
    records = {"config.json": read_json(layout.config), "stats.json": read_json(layout.stats),
               "shards.json": read_json(layout.shards), "_reshard.json": read_json(moved.kept / "_reshard.json"),
               "recommended.yaml": yaml.safe_load(text), "eval summary": read_json(layout.eval_summary)["recommended"]["config"]}
    paths = {(name, p) for name, data in records.items() for p in recorded_paths(data)}
    assert {p for _, p in paths} >= {str(moved.root / "data" / "tiny.json"), str(moved.root / "data" / "target.parquet")}
    for name, path in paths:
        assert os.path.isabs(path) and os.path.normpath(path) == path, (name, path)
        assert all(os.path.exists(p) for p in braceexpand.braceexpand(path)), (name, path)
    assert "/work/" not in text and "/work-renamed/" not in text


def test_consumers_from_another_directory(moved, monkeypatch, tmp_path):
    monkeypatch.chdir(moved.other)
    run = "../runs/x"
    man = ld.read_manifest(run)
    kept = set(man.filter(man["keep"])["uid"].to_pylist())
    assert len(ld.manifest_dataframe(run)) == 48 and len(ld.load_embeddings(run)["uid"]) == len(kept)
    filtered = wds.WebDataset(ld.kept_urls(run), shardshuffle=False).select(ld.KeptFilter(run))
    assert {f"{Path(s['__url__']).stem}/{s['__key__']}" for s in filtered} == kept
    assert {s["uid"] for s in ld.ManifestDataset(run)} == kept
    pattern = read_json("../kept/_reshard.json")["pattern"]
    assert sum(1 for _ in wds.WebDataset(pattern, shardshuffle=False)) == len(kept)
    assert main(["report", run]) == 0 and (moved.run / "report.html").exists()
    assert main(["teacher", run, "--classes", "a,b,c", "--allow-random-weights", "--device", "cpu"]) == 0
    assert ld.load_teacher(run, sorted(kept))["logits"].shape == (len(kept), 3)
    assert main(["train", run, "--model", "head", "--epochs", "1", "--kd"]) == 0
    assert main(["export-datacomp", run, str(tmp_path / "s.npy"), "--uid-source", "key"]) == 2  # keys not hex


def test_run_recommended_yaml_from_another_directory(moved, monkeypatch):
    monkeypatch.chdir(moved.other)
    assert main(["run", "../runs/x/eval/recommended.yaml", "--input", "../data/shards", "--output", "../runs/y"]) == 0
    x, y = read_json(moved.run / "config.json"), read_json(moved.root / "runs" / "y" / "config.json")
    assert y["embed"] == x["embed"] and y["score"]["params"] == x["score"]["params"]
    assert pq.read_table(moved.root / "runs" / "y" / "manifest").num_rows == 48
    assert json.loads(json.dumps(y["select"]))["keep_fraction"] == 0.5
