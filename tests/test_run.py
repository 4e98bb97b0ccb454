"""The run folder's layout (run.RunLayout): every stage folder reads as a table, one place spells the paths."""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datapruning.cli import main
from datapruning.consumers import loaders as ld
from datapruning.consumers.teacher import TeacherConfig, run_teacher
from datapruning.errors import RunNotReady
from datapruning.io.tables import embedding_column
from datapruning.run import FILES, STAGE_DIRS, RunLayout
from conftest import make_download_folder, tiny_clip_overrides

PACKAGE = Path(__file__).resolve().parent.parent / "datapruning"
TABLES = ("embed", "cluster", "score", "select", "manifest", "teacher")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_config):
    """A run over an img2dataset-style folder whose shard 00000000 has no readable sample, plus teacher logits."""
    root = tmp_path_factory.mktemp("layout")
    make_download_folder(root / "download", n_shards=4, per_shard=8, empty_shard=0)  # first: readers take its schema
    argv = ["run", "--input", str(root / "download"), "--output", str(root / "run")]
    assert main(argv + [a for o in tiny_clip_overrides(tiny_clip_config) for a in ("--set", o)]) == 0
    uids = ld.read_manifest(root / "run", columns=["uid"])["uid"]
    logits = np.random.default_rng(0).normal(size=(len(uids), 3)).astype(np.float32)
    pq.write_table(pa.table({"uid": uids, "logits": embedding_column(logits)}), root / "logits.parquet")
    run_teacher(root / "run", TeacherConfig(source="logits", logits=str(root / "logits.parquet")))  # no class names:
    return root / "run"  # the empty shard learns the width from the others


@pytest.mark.parametrize("stage", TABLES)
def test_every_stage_folder_reads_as_one_table(run, stage, tmp_path):
    layout = RunLayout(run)
    folder = layout.dir(stage)
    assert {p.suffix for p in folder.iterdir()} == {".parquet"}, sorted(folder.iterdir())
    empty = pq.ParquetFile(layout.shard_file(stage, "00000000"))
    assert empty.metadata.num_rows == 0 and empty.metadata.num_row_groups == 0
    rows = sum(pq.read_metadata(p).num_rows for p in folder.iterdir())
    assert rows > 0
    table = pq.read_table(folder)
    assert table.num_rows == rows and "uid" in table.column_names
    assert len(pd.read_parquet(folder)) == rows
    if importlib.util.find_spec("polars") is not None:
        import polars as pl

        assert pl.scan_parquet(str(folder / "*.parquet")).collect().height == rows
    datasets = pytest.importorskip("datasets")
    hf = datasets.load_dataset("parquet", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(hf) == rows and sorted(hf["uid"]) == sorted(table["uid"].to_pylist())


def test_paths_are_absolute_and_config_free(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = RunLayout("a/../runs/x")
    assert layout.root == tmp_path / "runs" / "x"
    assert layout.centroids.parent == layout.meta("cluster") == tmp_path / "runs" / "x" / "_meta" / "clusters"
    assert layout.parts.parent == layout.meta("cluster") and layout.teacher_info.parent == layout.meta("teacher")
    assert all(getattr(layout, name).is_relative_to(layout.root) for name in FILES)
    with pytest.raises(AttributeError):
        layout.centroid  # noqa: B018 - a misspelled name is an error, not a path


def spelled_names() -> set[str]:
    """The file and folder names that only run.py may write in a path."""
    return {Path(rel).name for _, rel in FILES.values()} | set(STAGE_DIRS.values())


def test_no_module_but_run_py_spells_a_run_path():
    names, found = spelled_names(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "run.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                right = node.right
                if isinstance(right, ast.Constant) and right.value in names:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: / {right.value!r}")
    assert not found, "build run paths with run.RunLayout:\n" + "\n".join(found)


def test_a_run_folder_from_before_the_move_is_refused_in_one_line(run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run, old)
    layout = RunLayout(old)
    os.replace(layout.centroids, layout.dir("cluster") / "centroids.npy")  # where older versions kept it
    with pytest.raises(RunNotReady, match="written by an older datapruning .*rerun 'datapruning run'"):
        ld.read_manifest(old)
    for argv in (["select", "--output", str(old)], ["report", str(old)], ["reshard", str(old), "-o",
                                                                          str(tmp_path / "r"), "-n", "5"]):
        r = subprocess.run([sys.executable, "-m", "datapruning", *argv], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
        assert "written by an older datapruning" in r.stderr
