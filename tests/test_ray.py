"""backend: ray on a local 2-CPU Ray instance gives byte-identical manifests to backend: local."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import blobs, make_png_shards, tiny_clip_overrides
from datapruning.config import load_config
from datapruning.runner import run_pipeline
from datapruning.run import RunLayout

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False)
    yield ray
    ray.shutdown()


def write_shards_with_duplicates(folder, n_shards=4, per_shard=50, d=16, k=5, seed=3):
    """Blobs plus exact and near duplicates (some across shards), so SemDeDup has ties to break."""
    x, truth = blobs(n_shards * per_shard, d, k, seed, spread=0.2)
    rng = np.random.default_rng(seed)
    src = rng.choice(len(x), size=len(x) // 5, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(len(x)), src), size=len(src), replace=False)
    x[dst[: len(dst) // 2]] = x[src[: len(src) // 2]]  # exact duplicates
    near = x[src[len(src) // 2:]] + 1e-3 * rng.normal(size=(len(src) - len(src) // 2, d)).astype(np.float32)
    x[dst[len(dst) // 2:]] = near / np.linalg.norm(near, axis=1, keepdims=True)
    truth[dst] = truth[src]
    folder.mkdir(parents=True)
    for s in range(n_shards):
        rows = slice(s * per_shard, (s + 1) * per_shard)
        pq.write_table(pa.table({"uid": [f"u{i:05d}" for i in range(rows.start, rows.stop)],
                                 "embedding": pa.array(list(x[rows]), type=pa.list_(pa.float32())),
                                 "label": truth[rows].astype(np.int64)}), folder / f"part-{s:02d}.parquet")
    return folder


def outputs(out):
    files = sorted((out / "manifest").glob("*.parquet")) + [out / "kept.parquet", RunLayout(out).centroids]
    files += sorted((out / "scores").glob("*.parquet")) + sorted((out / "clusters").glob("*.parquet"))
    return {str(f.relative_to(RunLayout(out).root)): f.read_bytes() for f in files}


def score_info(out):
    info = json.loads((out / "_meta" / "scores" / "info.json").read_text())
    return {m: {k: v for k, v in i.items() if k != "seconds"} for m, i in info.items()}


def test_ray_precomputed_equals_local(ray_local, tmp_path):
    inp = write_shards_with_duplicates(tmp_path / "emb")
    args = ["embed.encoder=precomputed", "cluster.k=5", "cluster.niter=10", "seed=7",
            "score.metrics=[ssp,random,semdedup,dbp]", "select.method=dbp", "select.keep_fraction=0.5",
            "select.dedup_keep_fraction=0.8"]
    run_pipeline(load_config(None, args), str(inp), tmp_path / "local")
    # the Ray workers open the shards through fsspec: give them chained fsspec URLs, not plain paths
    urls = [f"simplecache::file://{p}" for p in sorted(inp.glob("*.parquet"))]
    stats = run_pipeline(load_config(None, args + ["backend=ray"]), urls, tmp_path / "ray")
    assert json.loads((tmp_path / "ray" / "shards.json").read_text())["shards"][0]["path"].startswith("simplecache::")
    local, distributed = outputs(tmp_path / "local"), outputs(tmp_path / "ray")
    assert local.keys() == distributed.keys() and len(local) == 4 + 2 + 4 + 4
    for name in local:
        assert local[name] == distributed[name], name
    assert score_info(tmp_path / "local") == score_info(tmp_path / "ray")
    # the run really went through Ray and really deduplicated
    assert json.loads(RunLayout(tmp_path / "ray").fit_info.read_text())["ray"]["num_cpus"] == 2
    manifest = pq.read_table(tmp_path / "ray" / "manifest").to_pandas()
    assert (manifest["score_semdedup"] > 0.999).sum() >= 20
    assert stats["select"]["dedup"]["removed"] > 0 and stats["kept"] == 100


def test_ray_embedding_actors_equal_local(ray_local, tmp_path, tiny_clip_config):
    inp = tmp_path / "shards"
    make_png_shards(inp, n_shards=3, per_shard=10)
    args = tiny_clip_overrides(tiny_clip_config) + ["score.metrics=[ssp,semdedup]"]
    run_pipeline(load_config(None, args), str(inp), tmp_path / "local")
    run_pipeline(load_config(None, args + ["backend=ray"]), str(inp), tmp_path / "ray")
    local, distributed = outputs(tmp_path / "local"), outputs(tmp_path / "ray")
    assert local == distributed
    emb = {n: pq.read_table(tmp_path / n / "embeddings") for n in ("local", "ray")}
    assert emb["local"].equals(emb["ray"])


def test_ray_task_error_is_the_original_error(ray_local, tmp_path):
    inp = tmp_path / "emb"
    inp.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "embedding": pa.array([[1.0, 0.0], [0.0, 1.0]])}),
                   inp / "part-0.parquet")
    from datapruning.errors import InputError

    with pytest.raises(InputError, match="missing column 'uid'"):
        run_pipeline(load_config(None, ["embed.encoder=precomputed", "cluster.k=2", "backend=ray"]), str(inp),
                     tmp_path / "ray")
