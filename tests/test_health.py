"""A done marker never outlives its data (issue 28): lost stage files are redone where a later stage still reads
them, the manifest comes out byte-identical, and ``datapruning status`` says what is done, partial, stale or
missing without writing anything. A shard replaced in place is redone with the stages after it (issue 22.6)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_parquet_shards
from datapruning.config import load_config
from datapruning.run import RunLayout
from datapruning.runner import run_pipeline

SETS = ["embed.encoder=precomputed", "cluster.k=4", "cluster.niter=5", "cluster.partition_mib=1",
        "score.metrics=[ssp,random,semdedup]", "select.keep_fraction=0.4", "select.dedup_keep_fraction=0.9"]
# every folder a stage writes, and one file of each (part-001: the second shard; g00000: the first cluster group)
FOLDERS = ["embeddings", "clusters", "_meta/clusters/parts", "_meta/clusters/ties", "scores", "select", "manifest"]
FILES = ["embeddings/part-001.parquet", "clusters/part-001.parquet", "_meta/clusters/parts/part-001.emb",
         "_meta/clusters/parts/part-001.idx", "_meta/clusters/ties/part-001.u64", "_meta/clusters/centroids.npy",
         "_meta/clusters/fit.json", "scores/part-001.parquet", "select/part-001.parquet", "manifest/part-001.parquet",
         "kept.parquet", "stats.json"]


def snapshot(out: Path) -> dict[str, bytes]:
    files = sorted((out / "manifest").glob("*.parquet")) + [out / "kept.parquet"]
    return {f.name: f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    make_parquet_shards(root / "emb", n_shards=3, per_shard=60)
    run_pipeline(load_config(None, SETS), str(root / "emb"), root / "ref")
    return root


def rerun(root: Path, run: Path) -> dict:
    return run_pipeline(load_config(None, SETS), str(root / "emb"), run)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datapruning.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("lost", FOLDERS + FILES)
def test_a_lost_folder_or_file_is_redone_where_needed(finished, tmp_path, lost, caplog):
    """Delete it alone (redone only if a stage that reads it must run: the manifest and the kept list are), then
    delete it together with one manifest file (the manifest must be redone, so whatever it needs is): both
    reruns give the uninterrupted run's manifest bytes, and the log names what was lost."""
    expected = snapshot(finished / "ref")
    for extra in ([], ["manifest/part-001.parquet"]):
        run = tmp_path / f"run{len(extra)}"
        shutil.copytree(finished / "ref", run)
        assert (run / lost).exists(), lost
        for rel in [lost, *extra]:
            shutil.rmtree(run / rel) if (run / rel).is_dir() else (run / rel).unlink(missing_ok=True)
        caplog.clear()
        with caplog.at_level("INFO", logger="datapruning"):
            rerun(finished, run)
        assert snapshot(run) == expected, f"{lost} {extra}"
        assert json.loads((run / "stats.json").read_text())["kept"] == pq.read_metadata(run / "kept.parquet").num_rows
        logged = caplog.text
        if extra or lost.startswith("manifest") or lost in ("kept.parquet", "stats.json"):
            assert "redoing" in logged and "is missing" in logged, logged[-3000:]
        assert not list(run.rglob("*.tmp"))


def test_a_lost_group_score_file_is_redone(finished, tmp_path, monkeypatch, caplog):
    """The score stage stops after its cluster groups are scored (their files live until the stage is done);
    one group's file is deleted; the rerun names it, scores that group again and gives the same manifest."""
    import datapruning.score.stage as score_stage

    def crash(*args):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(score_stage, "score_shards", crash)
        with pytest.raises(KeyboardInterrupt):
            rerun(finished, run)
    lost = run / "_meta" / "scores" / "parts" / "semdedup" / "g00000.bin"
    assert lost.exists()
    lost.unlink()
    with caplog.at_level("INFO", logger="datapruning"):
        rerun(finished, run)
    assert snapshot(run) == snapshot(finished / "ref")
    assert "g00000.bin is missing" in caplog.text, caplog.text[-3000:]


def test_a_replaced_or_cut_file_is_redone(finished, tmp_path, caplog):
    """A stage file replaced by another shard's (same name, other content) or cut short is named and redone."""
    run = tmp_path / "run"
    shutil.copytree(finished / "ref", run)
    shutil.copy(run / "manifest" / "part-000.parquet", run / "manifest" / "part-002.parquet")
    data = (run / "select" / "part-001.parquet").read_bytes()
    (run / "select" / "part-001.parquet").write_bytes(data[: len(data) // 2])
    (run / "manifest" / "part-001.parquet").unlink()  # so the manifest must read select/ again
    with caplog.at_level("INFO", logger="datapruning"):
        rerun(finished, run)
    assert snapshot(run) == snapshot(finished / "ref")
    assert "part-001 (select/part-001.parquet is truncated" in caplog.text
    assert "part-002 (manifest/part-002.parquet is " in caplog.text


def test_status_lists_each_stage_and_writes_nothing(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished / "ref", run)
    shutil.rmtree(run / "scores")
    (run / "manifest" / "part-002.parquet").unlink()
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    proc = cli("status", str(run))
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(maxsplit=1) for line in proc.stdout.splitlines() if not line.startswith("'"))
    assert lines["embed"].startswith("done") and lines["cluster"].startswith("done")
    assert lines["score"].startswith("missing") and "scores/part-000.parquet is missing" in lines["score"]
    assert lines["select"].startswith("done")
    assert lines["manifest"].startswith("partial") and "part-002 (manifest/part-002.parquet is missing)" \
        in lines["manifest"]
    assert "'datapruning run' would redo: score, manifest" in proc.stdout
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*")}  # nothing written, nothing removed
    assert cli("status", str(finished / "ref")).stdout.splitlines()[-1] == \
        "'datapruning run' would redo: nothing (the run is complete)"


def test_a_single_stage_names_the_stage_whose_outputs_are_lost(finished, tmp_path):
    """'select' with a new config after scores/ was deleted (or after a changed cluster stage cleared it) names
    the stage to rerun instead of failing on a path."""
    run = tmp_path / "run"
    shutil.copytree(finished / "ref", run)
    shutil.rmtree(run / "scores")
    proc = cli("select", "--output", str(run), "--set", "select.keep_fraction=0.3")
    assert proc.returncode == 2
    assert f"select: {run}/scores/part-000.parquet is missing; rerun 'datapruning score'" in proc.stderr
    assert cli("score", "--output", str(run)).returncode == 0
    assert cli("select", "--output", str(run), "--set", "select.keep_fraction=0.3").returncode == 0
    changed = cli("cluster", "--output", str(run), "--set", "cluster.k=3")
    assert changed.returncode == 0, changed.stderr
    proc = cli("select", "--output", str(run))
    assert proc.returncode == 2
    assert "select: the score stage has not finished" in proc.stderr and "run 'datapruning score' first" in proc.stderr


def test_deleting_what_no_later_stage_reads_saves_disk(finished, tmp_path):
    """After the manifest, every stage folder but the manifest can go; a run leaves them gone and status says
    nothing needs them (docs/reliability.md#deleting-stage-folders)."""
    run = tmp_path / "run"
    shutil.copytree(finished / "ref", run)
    for folder in ("embeddings", "clusters", "scores", "select"):
        shutil.rmtree(run / folder)
    proc = cli("run", "--input", str(finished / "emb"), "--output", str(run), *[x for s in SETS for x in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert snapshot(run) == snapshot(finished / "ref")
    assert not (run / "embeddings").exists() and not (run / "scores").exists()
    status = cli("status", str(run)).stdout
    assert status.count("[not needed: the stages after it are done]") == 4, status


def test_a_shard_replaced_in_place_is_redone_with_the_later_stages(tmp_path):
    """Same path, new content (500 new uids): the next run notices (size, mtime), redoes that shard and every
    stage after it, and the manifest holds the new uids; status says stale before."""
    inp = tmp_path / "emb"
    make_parquet_shards(inp, n_shards=3, per_shard=60)
    sets = [x for s in SETS for x in ("--set", s)]
    assert cli("run", "--input", str(inp), "--output", str(tmp_path / "run"), *sets).returncode == 0
    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    pq.write_table(pa.table({"uid": [f"new-{i}" for i in range(500)],
                             "embedding": pa.array(list(x), pa.list_(pa.float32())),
                             "label": rng.integers(4, size=500), "split": ["train"] * 500}), inp / "part-001.parquet")
    status = cli("status", str(tmp_path / "run")).stdout
    assert "embed     stale    input changed since: part-001" in status, status
    proc = cli("run", "--input", str(inp), "--output", str(tmp_path / "run"), *sets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "part-001 (" in proc.stderr and "size" in proc.stderr
    uids = pq.read_table(tmp_path / "run" / "manifest", columns=["uid"])["uid"].to_pylist()
    assert sum(u.startswith("new-") for u in uids) == 500 and len(uids) == 620
    assert cli("run", "--input", str(inp), "--output", str(tmp_path / "ref"), *sets).returncode == 0
    assert snapshot(tmp_path / "run") == snapshot(tmp_path / "ref")


def test_a_deleted_teacher_folder_is_computed_again(finished, tmp_path):
    """rm -rf RUN/teacher, then 'datapruning teacher': every shard's parquet is written again (the markers in
    _meta/ no longer vouch for files that are gone), and its info counts the rows that are there."""
    run = tmp_path / "run"
    shutil.copytree(finished / "ref", run)
    uids = pq.read_table(run / "manifest", columns=["uid"])["uid"].to_pylist()
    logits = np.random.default_rng(0).normal(size=(len(uids), 4)).astype(np.float32)
    pq.write_table(pa.table({"uid": uids, "logits": pa.array(list(logits), pa.list_(pa.float32()))}),
                   tmp_path / "l.parquet")
    args = ("teacher", str(run), "--source", "logits", "--logits", str(tmp_path / "l.parquet"), "--all")
    assert cli(*args).returncode == 0
    first = {p.name: p.read_bytes() for p in (run / "teacher").glob("*.parquet")}
    shutil.rmtree(run / "teacher")
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "teacher: redoing 3 shard(s) whose files are missing" in proc.stderr
    assert {p.name: p.read_bytes() for p in (run / "teacher").glob("*.parquet")} == first
    info = json.loads(RunLayout(run).teacher_info.read_text())
    assert info["rows"] == len(uids) == pq.read_table(run / "teacher").num_rows
