"""Bit-identical scores: no thread count, BLAS order or block shape changes a stored value (docs/methods.md)."""
from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import blobs, make_parquet_shards
from datapruning.metrics.dbp import d_inter
from datapruning.metrics.exact import exact_dot, row_dots, settle, unit_rows
from datapruning.metrics.semdedup import semdedup_scores

ROOT = Path(__file__).resolve().parents[1]


def near_duplicates(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit rows in 3 clusters, every third row a tiny perturbation of another: similarities near 1."""
    x, truth = blobs(n, d, 3, seed=seed, spread=0.2)
    rng = np.random.default_rng(seed)
    x[2::3] = x[1::3][: len(x[2::3])] + rng.normal(0, 1e-4, size=(len(x[2::3]), d)).astype(np.float32)
    x = unit_rows(x)
    cos_dist = rng.random(n).astype(np.float32)
    return x, truth, cos_dist


def brute_semdedup(x, cluster, order):
    """fl32 of the exact maximum similarity to an earlier member, by math.fsum (the definition)."""
    out = np.full(len(x), -1.0)
    for c in np.unique(cluster):
        rows = [r for r in order if cluster[r] == c]
        for j, r in enumerate(rows[1:], start=1):
            out[r] = float(np.float32(max(exact_dot(x[r], x[e]) for e in rows[:j])))
    return np.clip(out, -1.0, 1.0)


def test_semdedup_equals_the_exact_definition_and_ignores_summation_order():
    x, cluster, cos_dist = near_duplicates(240, 24, seed=0)
    ref = semdedup_scores(x, cluster, cos_dist, block_rows=2048)
    order = np.lexsort((np.arange(len(x)), -cos_dist.astype(np.float64)))  # hard: farthest first
    np.testing.assert_array_equal(ref, brute_semdedup(x, cluster, order))
    perm = np.random.default_rng(2).permutation(24)
    for block in (7, 64, 2048):
        got = semdedup_scores(np.ascontiguousarray(x[:, perm]), cluster, cos_dist, block_rows=block)
        np.testing.assert_array_equal(got, ref)


def test_semdedup_on_exact_duplicates_takes_the_float64_block_path_and_stays_exact():
    """A cluster of exact copies makes every entry a near-tie (exact.row_max recomputes whole blocks in float64)."""
    base = unit_rows(np.random.default_rng(6).normal(size=(3, 20)).astype(np.float32))
    x = np.repeat(base, 40, axis=0)
    cluster = np.zeros(len(x), np.int64)
    cos_dist = np.random.default_rng(7).random(len(x)).astype(np.float32)
    ref = semdedup_scores(x, cluster, cos_dist, block_rows=16)
    order = np.lexsort((np.arange(len(x)), -cos_dist.astype(np.float64)))
    np.testing.assert_array_equal(ref, brute_semdedup(x, cluster, order))
    np.testing.assert_array_equal(semdedup_scores(x, cluster, cos_dist, block_rows=2048), ref)


def test_settle_recomputes_exactly_where_the_bound_leaves_the_rounding_open():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(50, 32)).astype(np.float32)
    b = rng.normal(size=(50, 32)).astype(np.float32)
    v = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
    calls = []

    def exact(i):
        calls.append(i)
        return exact_dot(a[i], b[i])

    got = settle(v, np.full(50, 1e-3), exact)  # a huge bound: every value is recomputed
    assert len(calls) == 50
    np.testing.assert_array_equal(got, np.array([np.float32(math.fsum((a[i].astype(float) * b[i]).tolist()))
                                                 for i in range(50)]))
    np.testing.assert_array_equal(row_dots(a, b), got)


def test_d_inter_and_unit_rows_ignore_summation_order():
    raw = np.random.default_rng(3).normal(size=(300, 48)).astype(np.float32)
    perm = np.random.default_rng(4).permutation(48)
    c = unit_rows(raw)
    np.testing.assert_array_equal(unit_rows(np.ascontiguousarray(raw[:, perm])), c[:, perm])
    np.testing.assert_array_equal(d_inter(np.ascontiguousarray(c[:, perm]), l=7), d_inter(c, l=7))


def manifest_digest(run: Path) -> str:
    h = hashlib.sha256()
    for path in sorted((run / "manifest").glob("*.parquet")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("recipe", ["semdedup_dbp", "ssp", "el2n_ccs"])
def test_thread_count_does_not_change_the_manifest(recipe, tmp_path):
    """The same recipe with 1 and 4 BLAS/OpenMP/torch threads writes byte-identical manifests."""
    inp = tmp_path / "emb"
    make_parquet_shards(inp, n_shards=3, per_shard=120, d=32, k=5)
    digests = {}
    for threads in (1, 4):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads)}
        out = tmp_path / f"run{threads}"
        proc = subprocess.run([sys.executable, "-m", "datapruning", "run", str(ROOT / "configs" / f"{recipe}.yaml"),
                               "--input", str(inp), "--output", str(out), "--set", "embed.encoder=precomputed",
                               "--set", "cluster.k=8"], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests[threads] = manifest_digest(out)
    assert digests[1] == digests[4]


@pytest.mark.parametrize("recipe", ["semdedup_dbp", "ssp"])
def test_summation_order_does_not_change_the_manifest(recipe, tmp_path):
    """Permuting the embedding coordinates reorders every sum inside faiss, BLAS and numpy, as another machine,
    BLAS build or block shape would: the manifests (clusters, cos_dist, every score, keep) are byte-identical."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datapruning.config import load_config
    from datapruning.runner import run_pipeline

    make_parquet_shards(tmp_path / "a", n_shards=3, per_shard=150, d=24, k=5)
    perm = np.random.default_rng(0).permutation(24)
    (tmp_path / "b").mkdir()
    for path in sorted((tmp_path / "a").glob("*.parquet")):
        t = pq.read_table(path)
        x = np.stack(t["embedding"].to_numpy(zero_copy_only=False))[:, perm]
        t = t.set_column(t.schema.get_field_index("embedding"), "embedding", pa.array(list(x), pa.list_(pa.float32())))
        pq.write_table(t, tmp_path / "b" / path.name)
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml", ["embed.encoder=precomputed", "cluster.k=8"])
    for side in ("a", "b"):
        run_pipeline(cfg, str(tmp_path / side), tmp_path / f"run-{side}")
    assert manifest_digest(tmp_path / "run-a") == manifest_digest(tmp_path / "run-b")
