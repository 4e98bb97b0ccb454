"""Same data, same answer: every shipped config keeps the same rows, with the same scores, whatever the shard names,
the shard count or the row order (docs/methods.md#random-seeded-baseline: everything is keyed by the uid hash)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import blobs
from datapruning.config import load_config
from datapruning.runner import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
N, D, K = 600, 16, 6


def rows() -> pa.Table:
    x, truth = blobs(N, D, K, seed=4, spread=0.3)
    labels = np.array([3, 17, 999, 42, 5, 8])[truth]  # label values that are not 0..C-1
    return pa.table({"uid": [f"img-{i:05d}" for i in range(N)], "embedding": pa.array(list(x), pa.list_(pa.float32())),
                     "label": pa.array(labels.astype(np.int64))})


def write(table: pa.Table, folder: Path, shards: int, names: str, seed: int | None) -> Path:
    """``table`` as ``shards`` parquet files named by ``names``, rows shuffled within each file when ``seed``."""
    folder.mkdir(parents=True)
    for s, part in enumerate(np.array_split(np.arange(table.num_rows), shards)):
        if seed is not None:
            part = np.random.default_rng([seed, s]).permutation(part)
        pq.write_table(table.take(pa.array(part)), folder / names.format(s))
    return folder


LAYOUTS = {  # the same rows, laid out three other ways
    "renamed": dict(shards=3, names="renamed-{:02d}.parquet", seed=None),
    "shuffled": dict(shards=3, names="part-{:03d}.parquet", seed=7),
    "resharded": dict(shards=5, names="part-{:03d}.parquet", seed=None),
    "all_three": dict(shards=4, names="zz-{:d}.parquet", seed=11),
}


def kept_rows(run: Path) -> pa.Table:
    """The manifest without the columns that name where a row lives, ordered by uid."""
    t = pq.read_table(run / "manifest")
    return t.drop([c for c in ("shard", "key") if c in t.column_names]).sort_by("uid")


def run(cfg_name: str, inp: Path, out: Path, target: Path) -> pa.Table:
    sets = ["embed.encoder=precomputed", f"cluster.k={K}"]
    if cfg_name.startswith("dp4tl"):
        sets.append(f"score.params.{cfg_name}.target={target}")
    run_pipeline(load_config(ROOT / "configs" / f"{cfg_name}.yaml", sets), str(inp), out)
    return kept_rows(out)


@pytest.mark.parametrize("cfg_name", CONFIGS)
def test_every_config_keeps_the_same_rows_however_the_data_is_laid_out(cfg_name, tmp_path, long_mode):
    table = rows()
    target = tmp_path / "target.parquet"
    pq.write_table(table.slice(0, 100).select(["embedding"]), target)
    base = run(cfg_name, write(table, tmp_path / "base", 3, "part-{:03d}.parquet", None), tmp_path / "run-base", target)
    assert 0 < int(np.sum(base["keep"].to_numpy(zero_copy_only=False))) < N
    for layout in (LAYOUTS if long_mode else ["all_three"]):
        got = run(cfg_name, write(table, tmp_path / layout, **LAYOUTS[layout]), tmp_path / f"run-{layout}", target)
        assert got.equals(base), f"{cfg_name}: the {layout} layout changed the manifest"
