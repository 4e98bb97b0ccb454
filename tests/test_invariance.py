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


WORDS = ["goldfish", "tabby cat", "golden retriever", "a red sports car", "mountain bike", "espresso"]


def rows() -> pa.Table:
    """Image and caption embeddings, labels that are not 0..C-1, captions and image sizes (DataComp's columns)."""
    x, truth = blobs(N, D, K, seed=4, spread=0.3)
    t, _ = blobs(N, D, K, seed=5, spread=0.3)
    t = x + 0.5 * t
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    labels = np.array([3, 17, 999, 42, 5, 8])[truth]
    rng = np.random.default_rng(6)
    return pa.table({
        "uid": [f"{i:032x}" for i in range(N)],
        "embedding": pa.array(list(x), pa.list_(pa.float32())),
        "text_embedding": pa.array(list(t.astype(np.float32)), pa.list_(pa.float32())),
        "label": pa.array(labels.astype(np.int64)),
        "text": [f"a photo of a {WORDS[c]} seen from the street, number {i}" if i % 7 else "x"
                 for i, c in enumerate(truth)],
        "original_width": rng.integers(100, 900, N), "original_height": rng.integers(100, 900, N)})


def write_shard(table: pa.Table, path: Path, datacomp: bool) -> None:
    """Precomputed parquet (embedding, text_embedding), or DataComp's metadata parquet plus its .npz."""
    if not datacomp:
        pq.write_table(table.drop(["text", "original_width", "original_height"]), path)
        return
    pq.write_table(table.drop(["embedding", "text_embedding"]), path)
    img = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float16)
    txt = np.stack(table["text_embedding"].to_numpy(zero_copy_only=False)).astype(np.float16)
    np.savez(path.with_suffix(".npz"), l14_img=img, l14_txt=txt, b32_img=img, b32_txt=txt)


def write(table: pa.Table, folder: Path, shards: int, names: str, seed: int | None, datacomp: bool = False) -> Path:
    """``table`` as ``shards`` files named by ``names``, rows shuffled within each file when ``seed``."""
    folder.mkdir(parents=True)
    for s, part in enumerate(np.array_split(np.arange(table.num_rows), shards)):
        if seed is not None:
            part = np.random.default_rng([seed, s]).permutation(part)
        write_shard(table.take(pa.array(part)), folder / names.format(s), datacomp)
    return folder


LAYOUTS = {  # the same rows, laid out three other ways
    "renamed": dict(shards=3, names="{:08d}.parquet", seed=None),  # DataComp names shards by number: 0, 1, 2 ...
    "shuffled": dict(shards=3, names="{:08d}.parquet", seed=7),
    "resharded": dict(shards=5, names="{:08d}.parquet", seed=None),
    "all_three": dict(shards=4, names="{:08d}.parquet", seed=11),
}


def kept_rows(run: Path) -> pa.Table:
    """The manifest without the columns that name where a row lives, ordered by uid."""
    t = pq.read_table(run / "manifest")
    return t.drop([c for c in ("shard", "key") if c in t.column_names]).sort_by("uid")


def run(cfg_name: str, inp: Path, out: Path, target: Path) -> pa.Table:
    sets = ["embed.encoder=precomputed", f"cluster.k={K}"]
    cfg = load_config(ROOT / "configs" / f"{cfg_name}.yaml")
    for metric in ("dp4tl_lm", "dp4tl_fm"):
        if metric in cfg.score.metrics:
            sets.append(f"score.params.{metric}.target={target}")
    run_pipeline(load_config(ROOT / "configs" / f"{cfg_name}.yaml", sets), str(inp), out)
    return kept_rows(out)


@pytest.mark.parametrize("cfg_name", CONFIGS)
def test_every_config_keeps_the_same_rows_however_the_data_is_laid_out(cfg_name, tmp_path, long_mode):
    table = rows()
    datacomp = load_config(ROOT / "configs" / f"{cfg_name}.yaml").input.format == "datacomp"
    target = tmp_path / "target.parquet"
    pq.write_table(table.slice(0, 100).select(["embedding"]), target)
    base = run(cfg_name, write(table, tmp_path / "base", 3, "{:08d}.parquet", None, datacomp), tmp_path / "run-base",
               target)
    assert 0 < int(np.sum(base["keep"].to_numpy(zero_copy_only=False))) <= N
    for layout in (LAYOUTS if long_mode else ["all_three"]):
        got = run(cfg_name, write(table, tmp_path / layout, **LAYOUTS[layout], datacomp=datacomp),
                  tmp_path / f"run-{layout}", target)
        assert got.equals(base), f"{cfg_name}: the {layout} layout changed the manifest"
