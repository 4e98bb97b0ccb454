"""The embed stage reads a precomputed parquet shard in chunks of rows (issue 27: memory follows the chunk, not
the shard): any chunk size gives the same rows, skips and manifest as reading the shard whole."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import datapruning.embed.tables as embed_tables
from datapruning.config import load_config
from datapruning.io.files import RowGroupWriter, write_parquet
from datapruning.run import RunLayout
from datapruning.runner import run_pipeline

SETS = ["embed.encoder=precomputed", "cluster.k=4", "cluster.niter=5", "score.metrics=[ssp,semdedup]",
        "select.method=rank", "select.metric=ssp", "select.keep_fraction=0.5"]


def hostile_shards(folder, d: int = 8, per_shard: int = 300, pair: bool = False):
    """Two shards with NaN and all-zero rows, and uids repeated within a shard far apart (in other chunks): the
    first copy of one repeated uid is invalid, so its later valid copy is the one kept."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for s in range(2):
        x = rng.normal(size=(per_shard, d)).astype(np.float32)
        x[5], x[17, 2], x[250] = 0.0, np.nan, np.inf
        uid = [f"s{s}-{i}" for i in range(per_shard)]
        uid[200], uid[290] = uid[3], uid[17]  # 3 valid first: 200 repeats; 17 invalid first: 290 is kept
        cols = {"uid": uid, "embedding": pa.array(list(x), pa.list_(pa.float32())),
                "label": rng.integers(0, 3, per_shard), "caption": [f"c{i}" for i in range(per_shard)]}
        if pair:
            cols["text_embedding"] = pa.array(list(rng.normal(size=(per_shard, d)).astype(np.float32)),
                                              pa.list_(pa.float32()))
        pq.write_table(pa.table(cols), folder / f"{s}.parquet", row_group_size=64)
    return folder


@pytest.mark.parametrize("pair", [False, True])
def test_any_chunk_size_gives_the_rows_skips_and_manifest_of_the_whole_shard(tmp_path, monkeypatch, pair):
    inp = hostile_shards(tmp_path / "in", pair=pair)
    sets = SETS + (["embed.modality=pair"] if pair else [])
    run_pipeline(load_config(None, sets), str(inp), tmp_path / "whole")
    monkeypatch.setattr(embed_tables, "CHUNK_BYTES", 4 * 8 * 7 * (2 if pair else 1))  # 7-row chunks
    monkeypatch.setattr(embed_tables, "GROUP_BYTES", 4 * 8 * 50)  # 50-row groups
    run_pipeline(load_config(None, sets), str(inp), tmp_path / "chunked")
    for name in ("0", "1"):
        whole = pq.read_table(tmp_path / "whole" / "embeddings" / f"{name}.parquet")
        chunked = pq.ParquetFile(tmp_path / "chunked" / "embeddings" / f"{name}.parquet")
        assert chunked.metadata.num_row_groups == -(-whole.num_rows // 50) > 1
        assert chunked.read().equals(whole)
        uids = whole["uid"].to_pylist()
        assert f"s{name}-17" in uids and uids.count(f"s{name}-3") == 1  # row 290's copy of 17 kept, 200's of 3 not
        done = [json.loads((RunLayout(tmp_path / run).meta("embed") / f"_{name}.done.json").read_text())
                for run in ("whole", "chunked")]
        assert done[0]["skipped"] == done[1]["skipped"] and done[0]["skipped"]["duplicate_key"] == 1
        assert done[0]["rows"] == done[1]["rows"] == whole.num_rows == 300 - 3 - 1
    for rel in ["kept.parquet", *sorted(p.name for p in (tmp_path / "whole" / "manifest").glob("*.parquet"))]:
        path = rel if rel == "kept.parquet" else f"manifest/{rel}"
        assert (tmp_path / "whole" / path).read_bytes() == (tmp_path / "chunked" / path).read_bytes(), path


def test_row_group_writer_bytes_follow_the_rows_not_the_hand_in(tmp_path):
    table = pa.table({"a": np.arange(1000), "b": [f"x{i}" for i in range(1000)]})
    with RowGroupWriter(tmp_path / "one.parquet", rows=1000) as w:
        w.add(table)
    write_parquet(tmp_path / "plain.parquet", table)
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "plain.parquet").read_bytes()
    for name, cuts in (("a", [0, 1000]), ("b", [0, 3, 3, 250, 999, 1000]), ("c", [0, 100, 600, 1000])):
        with RowGroupWriter(tmp_path / f"{name}.parquet", rows=128) as w:
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                w.add(table.slice(lo, hi - lo))
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.num_row_groups == 8
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes() \
        == (tmp_path / "c.parquet").read_bytes()
    with RowGroupWriter(tmp_path / "empty.parquet", rows=5) as w:
        w.add(table.slice(0, 0))
    assert pq.read_table(tmp_path / "empty.parquet").schema == table.schema
    assert pq.ParquetFile(tmp_path / "empty.parquet").metadata.num_row_groups == 0
    with pytest.raises(RuntimeError), RowGroupWriter(tmp_path / "failed.parquet", rows=5) as w:
        w.add(table)
        raise RuntimeError
    assert not list(tmp_path.glob("*failed*")) and not list(tmp_path.glob(".*.tmp"))
