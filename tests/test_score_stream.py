"""A group of clusters above its memory budget is scored in row-block tasks from disk, with the in-memory bits."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import datapruning.score.semdedup_stream as stream
import datapruning.score.stage as score_stage
from datapruning.config import load_config
from datapruning.runner import run_pipeline

ARGS = ["embed.encoder=precomputed", "cluster.k=3", "cluster.niter=5", "cluster.partition_mib=1",
        "score.metrics=[semdedup, dbp]", "score.params={semdedup: {block_rows: 16}}", "select.method=dbp",
        "select.dedup_keep_fraction=0.6", "select.keep_fraction=0.3"]


def copies_shards(folder, shards=4, per_shard=300, d=8):
    """Rows around 3 centres; a third of every shard are bit-identical copies of 5 rows (one crowded cluster)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, d)) * 3
    sources = (centres[0] + rng.normal(size=(5, d))).astype(np.float32)
    folder.mkdir(parents=True)
    for s in range(shards):
        x = (centres[rng.integers(3, size=per_shard)] + rng.normal(size=(per_shard, d))).astype(np.float32)
        copy = rng.random(per_shard) < 0.33
        x[copy] = sources[rng.integers(5, size=int(copy.sum()))]
        pq.write_table(pa.table({"uid": [f"u{s}-{i}" for i in range(per_shard)],
                                 "embedding": pa.array(list(x), pa.list_(pa.float32(), d))}), folder / f"{s:03d}.parquet")
    return folder


def test_streamed_groups_give_the_in_memory_scores_and_manifest(tmp_path, monkeypatch):
    inp = copies_shards(tmp_path / "emb")
    run_pipeline(load_config(None, ARGS), str(inp), tmp_path / "memory")
    monkeypatch.setattr(score_stage, "STREAM_OVER", 0)  # every group is "too large": streamed
    monkeypatch.setattr(stream, "TASK_PAIRS", 3000)  # many tasks, some holding blocks of several clusters
    monkeypatch.setattr(stream, "CHUNK_BYTES", 256)  # hash and copy a few rows at a time
    calls = []
    plain = stream.block_task
    monkeypatch.setattr(stream, "block_task", lambda *a: calls.append(len(a[-1])) or plain(*a))
    run_pipeline(load_config(None, ARGS), str(inp), tmp_path / "streamed")
    assert len(calls) > 3 and max(calls) > 1
    for sub in ("scores", "manifest"):
        names = sorted(p.name for p in (tmp_path / "memory" / sub).glob("*.parquet"))
        assert names and names == sorted(p.name for p in (tmp_path / "streamed" / sub).glob("*.parquet"))
        for name in names:
            assert (tmp_path / "memory" / sub / name).read_bytes() == (tmp_path / "streamed" / sub / name).read_bytes()
    meta = tmp_path / "streamed" / "_meta" / "scores"
    assert not (meta / "parts").exists() and not any((meta / "stream").iterdir())  # scratch and group files gone
    scores = pq.read_table(tmp_path / "streamed" / "scores")["score_semdedup"].to_numpy()
    assert (scores > 0.999999).sum() > 300  # the copies were found
