"""Every recipe in pipelines/ runs with one command on webdataset shards and on precomputed embeddings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import blobs, make_parquet_shards, make_png_shards, tiny_clip_overrides

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["ssp", "semdedup_dbp", "dp4tl_lm", "dp4tl_fm", "el2n_ccs", "random_kd"]
TARGETED = {"dp4tl_lm", "dp4tl_fm"}


def recipe(name: str, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def sets(items):
    return [x for item in items for x in ("--set", item)]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_on_precomputed(name, tmp_path):
    inp = tmp_path / "emb"
    make_parquet_shards(inp, n_shards=2, per_shard=150, d=16, k=6)
    extra = []
    if name in TARGETED:  # a downstream task that looks like blobs 0 and 1 of the source
        x, truth = blobs(900, 16, 6, seed=0)
        target = tmp_path / "target.parquet"
        pq.write_table(pa.table({"embedding": pa.array(list(x[truth < 2]), pa.list_(pa.float32()))}), target)
        extra = ["--target", target]
    out = tmp_path / "run"
    proc = recipe(name, "--precomputed", "--input", inp, "--output", out, *extra, *sets(["cluster.k=6"]))
    stats = json.loads((out / "stats.json").read_text())
    assert f"kept {stats['kept']} of 300" in proc.stdout
    assert 0 < stats["kept"] < 300
    manifest = pq.read_table(out / "manifest").to_pandas()
    if name == "dp4tl_lm":  # whole classes kept, the target's two classes first
        kept_labels = set(manifest[manifest.keep]["label"])
        assert {0, 1} <= kept_labels and all(manifest[manifest.label.isin(kept_labels)].keep)
    if name == "semdedup_dbp":
        assert stats["select"]["dedup"] and "quotas" in stats["select"]
        assert stats["kept"] == round(0.277 * 300)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_on_shards(name, tmp_path, tiny_clip_config):
    inp = tmp_path / "shards"
    make_png_shards(inp, n_shards=2, per_shard=12)
    overrides = tiny_clip_overrides(tiny_clip_config)
    extra = []
    if name in TARGETED:  # the target embedded with the same encoder
        target_shards = make_png_shards(tmp_path / "target", n_shards=1, per_shard=6, seed=5)
        subprocess.run([sys.executable, "-m", "datapruning.cli", "embed", "--input", target_shards[0],
                        "--output", tmp_path / "target_run", *sets(overrides)], check=True, capture_output=True)
        extra = ["--target", tmp_path / "target_run" / "embeddings"]
    out = tmp_path / "run"
    recipe(name, "--input", inp, "--output", out, *extra, *sets(overrides))
    manifest = pq.read_table(out / "manifest")
    assert manifest.num_rows == 24 and 0 < np.sum(manifest["keep"].to_numpy(zero_copy_only=False)) < 24


def test_errors_are_one_line_in_process(tmp_path, capsys):
    """Every recipe and the trainer print an expected error as one line and exit 2 (no traceback)."""
    import importlib

    for name in [*RECIPES, "train"]:
        main = importlib.import_module(f"datapruning.pipelines.{name}").main
        args = [str(tmp_path / "missing")] if name == "train" else [
            "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"),
            *(["--target", str(tmp_path / "t.parquet")] if name in TARGETED else [])]
        if name == "train":
            main = importlib.import_module("datapruning.pipelines.train").command
        assert main(args) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].endswith("no such file or folder") or "no shards.json" in err[-1], (name, err)
        assert "error:" in err[-1] and not any("Traceback" in line for line in err), (name, err)


@pytest.mark.parametrize("cmd", [["-m", "datapruning.pipelines.ssp"], [str(ROOT / "pipelines" / "train.py")]])
def test_errors_are_one_line_from_the_shell(cmd, tmp_path):
    args = [str(tmp_path / "missing")] if cmd[-1].endswith("train.py") else ["--input", str(tmp_path / "missing"),
                                                                             "--output", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, *cmd, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error:" in proc.stderr.strip().splitlines()[-1]
