"""End to end: webdataset PNG shards (tiny open_clip), precomputed parquet and clip-retrieval inputs."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from datapruning.config import load_config
from datapruning.runner import run_pipeline
from datapruning.run import RunLayout
from conftest import make_clip_retrieval, tiny_clip_overrides


def check_manifest(out, n_expected: int, keep_expected: int, metrics=("ssp", "random")) -> None:
    """The DESIGN.md manifest contract."""
    manifest = pq.read_table(out / "manifest")
    for col in ("uid", "shard", "key", "cluster", "cos_dist", "keep", *[f"score_{m}" for m in metrics]):
        assert col in manifest.column_names, col
    assert manifest.num_rows == n_expected
    assert len(set(manifest["uid"].to_pylist())) == n_expected
    keep = manifest["keep"].to_numpy(zero_copy_only=False)
    assert keep.sum() == keep_expected
    kept = pq.read_table(out / "kept.parquet")
    assert sorted(kept["uid"].to_pylist()) == sorted(np.asarray(manifest["uid"].to_pylist())[keep].tolist())
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples_in"] == n_expected and stats["kept"] == keep_expected
    assert stats["config"]["seed"] == 0 and "numpy" in stats["versions"]
    assert set(stats["wall_time_s"]) == {"embed", "cluster", "score", "select", "manifest"}
    assert sum(stats["clusters"]["sizes"]) == n_expected and sum(stats["clusters"]["kept"]) == keep_expected
    cos = manifest["cos_dist"].to_numpy()
    assert np.all(cos >= -1e-5) and np.all(cos <= 2 + 1e-5)


def test_webdataset_shards_tiny_open_clip(png_shards, tiny_clip_config, tmp_path):
    cfg = load_config(None, tiny_clip_overrides(tiny_clip_config))
    out = tmp_path / "run"
    stats = run_pipeline(cfg, str(png_shards[0].parent), out)
    check_manifest(out, 24, 12)
    assert stats["encoder"].startswith("open_clip:tiny-test-clip:RANDOM-INIT")
    manifest = pq.read_table(out / "manifest")
    assert manifest["label"].type == "int64"
    assert manifest["uid"][0].as_py() == "00000/s0-0000"
    # SSP score is exactly the cosine distance to the assigned centroid
    emb = pq.read_table(out / "embeddings")
    x = np.stack(emb["embedding"].to_numpy(zero_copy_only=False))
    centroids = np.load(RunLayout(out).centroids)
    expect = 1 - np.einsum("ij,ij->i", x, centroids[manifest["cluster"].to_numpy()])
    np.testing.assert_allclose(manifest["score_ssp"].to_numpy(), expect, atol=1e-5)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)


def test_text_tower_brace_pattern(png_shards, tiny_clip_config, tmp_path):
    cfg = load_config(None, tiny_clip_overrides(tiny_clip_config) + ["embed.modality=text"])
    pattern = str(png_shards[0].parent / "{00000..00001}.tar")
    run_pipeline(cfg, pattern, tmp_path / "run")
    check_manifest(tmp_path / "run", 16, 8)


def test_precomputed_parquet(parquet_shards, tmp_path):
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=4", "select.keep_count=30",
                             "select.mode=easy", "select.min_per_label=0.5"])
    out = tmp_path / "run"
    stats = run_pipeline(cfg, str(parquet_shards[0].parent), out)
    check_manifest(out, 120, 30)
    assert stats["encoder"] == "precomputed"
    manifest = pq.read_table(out / "manifest").to_pandas()
    assert set(manifest.columns) >= {"label", "split"}
    # the label floor: 0.5 * 30 / 4 labels -> at least 4 per label
    assert manifest[manifest.keep].groupby("label").size().min() >= 4


def test_clip_retrieval_folder(tmp_path):
    folder = make_clip_retrieval(tmp_path / "cr")
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=3", "select.keep_fraction=0.25"])
    out = tmp_path / "run"
    run_pipeline(cfg, str(folder), out)
    check_manifest(out, 60, 15)
    manifest = pq.read_table(out / "manifest")
    assert manifest["uid"][0].as_py() == "img/00000.jpg"
    assert sorted(set(manifest["shard"].to_pylist())) == ["img_emb_0", "img_emb_1"]


def test_same_seed_same_manifest_bytes(parquet_shards, tmp_path):
    args = ["embed.encoder=precomputed", "cluster.k=4", "select.mode=random"]
    for name in ("a", "b"):
        run_pipeline(load_config(None, args), str(parquet_shards[0].parent), tmp_path / name)
    for f in sorted((tmp_path / "a" / "manifest").glob("*.parquet")) + [tmp_path / "a" / "kept.parquet"]:
        other = tmp_path / "b" / f.relative_to(tmp_path / "a")
        assert f.read_bytes() == other.read_bytes(), f
    run_pipeline(load_config(None, args + ["seed=1"]), str(parquet_shards[0].parent), tmp_path / "c")
    assert (tmp_path / "a" / "kept.parquet").read_bytes() != (tmp_path / "c" / "kept.parquet").read_bytes()


def test_changed_select_config_redoes_only_later_stages(parquet_shards, tmp_path):
    out = tmp_path / "run"
    base = ["embed.encoder=precomputed", "cluster.k=4"]
    run_pipeline(load_config(None, base), str(parquet_shards[0].parent), out)
    centroids_mtime = RunLayout(out).centroids.stat().st_mtime_ns
    stats = run_pipeline(load_config(None, base + ["select.keep_fraction=0.1"]), str(parquet_shards[0].parent), out)
    assert stats["kept"] == 12
    assert RunLayout(out).centroids.stat().st_mtime_ns == centroids_mtime
    assert pq.read_table(out / "manifest")["keep"].to_numpy(zero_copy_only=False).sum() == 12


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "datapruning.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_stage_by_stage_equals_run(parquet_shards, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("embed:\n  encoder: precomputed\ncluster:\n  k: 4\nselect:\n  keep_fraction: 0.3\n")
    inp = parquet_shards[0].parent
    proc = cli("run", cfg, "--input", inp, "--output", tmp_path / "all")
    assert "kept 36 of 120" in proc.stdout
    cli("embed", cfg, "--input", inp, "--output", tmp_path / "steps")
    for stage in ("cluster", "score", "select", "manifest"):
        cli(stage, "--output", tmp_path / "steps")  # reuses the run folder's stored config
    for f in sorted((tmp_path / "all" / "manifest").glob("*.parquet")):
        assert f.read_bytes() == (tmp_path / "steps" / "manifest" / f.name).read_bytes()


@pytest.mark.parametrize("args, message", [
    (["run", "--input", "/nonexistent/x.tar", "--output", "OUT"], "no such file or folder"),
    (["run", "--input", "IN", "--output", "OUT", "--set", "cluster.k=0"], "'cluster.k': must be in [1, 10000000]"),
    (["run", "--input", "IN", "--output", "OUT", "--set", "select.mode=hardest"], "'select.mode'"),
    (["run", "--input", "IN", "--output", "OUT", "--set", "cluster.k=1000", "--set", "embed.encoder=precomputed"],
     "cluster.k=1000 is larger than the 120 samples"),
    (["cluster", "--output", "EMPTY"], "no shards.json"),
])
def test_cli_errors_are_one_line(parquet_shards, tmp_path, args, message):
    args = [str(parquet_shards[0].parent) if a == "IN" else str(tmp_path / a) if a in ("OUT", "EMPTY") else a
            for a in args]
    proc = cli(*args, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_process_pool_equals_in_process(png_shards, tiny_clip_config, tmp_path, monkeypatch):
    monkeypatch.setenv("DATAPRUNING_POOL_AFTER_S", "0")  # the pool from the first pass, however small the run
    base = tiny_clip_overrides(tiny_clip_config)
    run_pipeline(load_config(None, base), str(png_shards[0].parent), tmp_path / "one")
    run_pipeline(load_config(None, base + ["workers=2"]), str(png_shards[0].parent), tmp_path / "two")
    for f in sorted((tmp_path / "one" / "manifest").glob("*.parquet")) + [tmp_path / "one" / "kept.parquet"]:
        assert f.read_bytes() == (tmp_path / "two" / f.relative_to(tmp_path / "one")).read_bytes(), f
