"""The streaming stages give the same answers as the same rules on whole arrays in memory.

A run is read shard by shard and selected with exact per-group cutoffs found by radix passes; here the
pass sizes are shrunk so every radix and collection path runs, and the manifest is compared row by row
with the metrics and selectors applied to the run's arrays all at once, and with plain lexsort rankings.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import datapruning.cluster.unique as unique
import datapruning.cutoffs as cutoffs
from datapruning.cluster.parts import read_group
from datapruning.config import load_config
from datapruning.errors import StageError
from datapruning.cutoffs import find_cutoffs, keep_mask
from datapruning.metrics.ranking import order_key
from datapruning.rows import ArrayRows
from datapruning.run import Run, RunLayout, load_run_config
from datapruning.runner import run_pipeline
from datapruning.score import METRICS, ScoreInputs
from datapruning.metrics.ccs import ccs_default_beta
from datapruning.select import (SELECTORS, SelectInputs, ccs_select, select_class_balanced, select_top,
                              select_with_minimums)


def _keys(block):
    return block["g"], order_key(block["s"], block["mode"][0]), block["tie"], block["pos"].astype(np.uint64)


@pytest.mark.parametrize("collect, counters", [(0, 64), (0, 8), (10, 1 << 22), (10**9, 1 << 22)])
def test_cutoffs_match_a_lexsort_reference(monkeypatch, collect, counters):
    monkeypatch.setattr(cutoffs, "COLLECT_LIMIT", collect)
    monkeypatch.setattr(cutoffs, "COUNTERS", counters)
    rng = np.random.default_rng(collect)
    for trial in range(25):
        n, G = int(rng.integers(1, 2500)), int(rng.integers(1, 30))
        kind = trial % 3  # continuous scores, heavy ties, all equal
        s = [rng.normal(size=n), np.round(rng.normal(size=n), 1), np.zeros(n)][kind]
        s[rng.random(n) < 0.05] = np.nan
        g = rng.integers(-1, G, size=n)
        mode = ("hard", "easy", "random")[trial % 3]
        rows = ArrayRows({"g": g, "s": s, "mode": np.full(n, mode)}, seed=trial)
        q = rng.integers(0, 150, size=G)
        got = keep_mask(find_cutoffs(rows, _keys, q), _keys, rows.block)
        order = np.lexsort((np.arange(n), rows.block["tie"], order_key(s, mode)))
        expected, taken = np.zeros(n, bool), np.zeros(G, int)
        for i in order:
            if g[i] >= 0 and taken[g[i]] < q[g[i]]:
                expected[i], taken[g[i]] = True, taken[g[i]] + 1
        assert (got == expected).all(), (trial, int((got != expected).sum()))


def write_embedding_shards(folder, n_shards=5, per_shard=400, d=16, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d))
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        label = rng.integers(0, classes, per_shard)
        x = centers[label] + 0.6 * rng.normal(size=(per_shard, d))
        x[::7] = x[::7][::-1]  # exact duplicates for SemDeDup
        x[1::50] = x[0::50][: len(x[1::50])]
        pq.write_table(pa.table({
            "uid": [f"u{s}-{i:04d}" for i in range(per_shard)],
            "embedding": pa.array(list(x.astype(np.float32)), pa.list_(pa.float32(), d)),
            "label": pa.array(label.astype(str)),
        }), folder / f"{s:05d}.parquet")
    return folder


def in_memory(out, cfg):
    """Metrics and the selector on the run's whole arrays (read back from the cluster stage)."""
    emb = pq.read_table(out / "embeddings")
    cl = pa.concat_tables(pq.read_table(f, columns=["uid", "cluster", "cos_dist"])
                          for f in sorted((out / "clusters").glob("*.parquet")))
    assert emb["uid"].equals(cl["uid"])
    x = np.stack(emb["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    uid = np.asarray(emb["uid"].to_pylist(), dtype=object)
    labels = emb["label"].to_numpy(zero_copy_only=False).astype(np.int64)  # integer labels: code = value
    centroids = np.load(RunLayout(out).centroids)
    inp = ScoreInputs(uid=uid, embeddings=x, cluster=cl["cluster"].to_numpy().astype(np.int64),
                      cos_dist=cl["cos_dist"].to_numpy(), centroids=centroids, labels=labels, seed=cfg.seed)
    scores = {m: METRICS[m](inp, **cfg.score.params.get(m, {})).scores for m in cfg.score.metrics}
    sc = cfg.select
    eligible = None
    if sc.dedup_eps is not None:
        eligible = ~(scores["semdedup"] > 1.0 - sc.dedup_eps)
    n = int(round(sc.keep_fraction * len(uid)))
    if eligible is not None:
        n = min(n, int(eligible.sum()))
    sel = SelectInputs(uid=uid, cluster=inp.cluster, cos_dist=inp.cos_dist, centroids=centroids, scores=scores,
                       labels=labels, eligible=eligible, seed=cfg.seed)
    common = {k: getattr(sc, k) for k in ("metric", "mode", "min_per_cluster", "min_per_label")
              if k in SELECTORS[sc.method].common and getattr(sc, k) is not None}
    keep, _ = SELECTORS[sc.method](sel, n, **common, **dict(sc.params))
    return uid, scores, keep, inp


CASES = {
    "semdedup_dbp": ["score.metrics=[semdedup, dbp]", "select.method=dbp", "select.dedup_eps=0.01",
                     "select.keep_fraction=0.3", "select.min_per_cluster=0.2"],
    "rank_floors": ["score.metrics=[ssp, random]", "select.method=rank", "select.metric=ssp",
                    "select.keep_fraction=0.4", "select.min_per_cluster=0.3", "select.min_per_label=0.2"],
    "balanced_easy": ["score.metrics=[random, ssp]", "select.method=balanced", "select.metric=ssp",
                      "select.mode=easy", "select.keep_fraction=0.25", "select.params={by: label}"],
    "ccs_el2n": ["score.metrics=[el2n]", "select.method=ccs", "select.metric=el2n", "select.keep_fraction=0.2",
                 "score.params={el2n: {n_models: 2, epochs: 1, max_train: 600}}"],
    "random_rank": ["score.metrics=[random]", "select.method=rank", "select.metric=random", "select.mode=random",
                  "select.keep_fraction=0.5"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_run_equals_in_memory(tmp_path, monkeypatch, case):
    monkeypatch.setattr(cutoffs, "COLLECT_LIMIT", 50)  # force the radix passes
    monkeypatch.setattr(cutoffs, "COUNTERS", 256)
    inp = write_embedding_shards(tmp_path / "emb")
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=8", "cluster.partition_mib=1", *CASES[case]])
    out = tmp_path / "run"
    run_pipeline(cfg, str(inp), out)
    manifest = pq.read_table(out / "manifest")
    uid, scores, keep, _ = in_memory(out, cfg)
    assert manifest["uid"].to_pylist() == uid.tolist()
    for m, s in scores.items():
        got = manifest[f"score_{m}"].to_numpy()
        assert np.array_equal(np.isnan(got), np.isnan(s)) and np.array_equal(got[~np.isnan(s)], s[~np.isnan(s)]), m
    assert (manifest["keep"].to_numpy(zero_copy_only=False) == keep).all()
    assert keep.sum() > 0
    array_fn = ARRAY_FUNCTIONS.get(case)
    if array_fn is not None:  # the importable function on the run's arrays keeps what the stage kept
        n = int(round(cfg.select.keep_fraction * len(uid)))
        np.testing.assert_array_equal(array_fn(scores, n, uid, manifest), keep)


def _labels(manifest) -> np.ndarray:
    return manifest["label"].to_numpy(zero_copy_only=False).astype(np.int64)


ARRAY_FUNCTIONS = {  # case -> the datapruning.select function called as a user would, on the run's arrays
    "rank_floors": lambda s, n, uid, m: select_with_minimums(
        s["ssp"], n, "hard", 0, m["cluster"].to_numpy(), 0.3, floors=((_labels(m), 0.2),), uid=uid),
    "balanced_easy": lambda s, n, uid, m: select_class_balanced(s["ssp"], n, "easy", 0, _labels(m), uid=uid),
    "ccs_el2n": lambda s, n, uid, m: ccs_select(s["el2n"], n, beta=ccs_default_beta(1 - n / len(uid)), seed=0,
                                                uid=uid),
    "random_rank": lambda s, n, uid, m: select_top(s["random"], n, "random", 0, uid=uid),
}


def test_rank_with_floors_equals_the_lexsort_rule(tmp_path):
    """The streaming rank selector keeps what select_with_minimums keeps with the same tie keys."""
    inp = write_embedding_shards(tmp_path / "emb", n_shards=3, per_shard=300)
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=6", *CASES["rank_floors"]])
    run_pipeline(cfg, str(inp), tmp_path / "run")
    manifest = pq.read_table(tmp_path / "run" / "manifest")
    uid, scores, _, base = in_memory(tmp_path / "run", cfg)
    from datapruning.metrics.random import uid_hash

    n = int(round(0.4 * len(uid)))
    expected = select_with_minimums(scores["ssp"], n, "hard", 0, base.cluster, 0.3,
                                    floors=((base.labels, 0.2),), tie=uid_hash(uid.astype(str), 0))
    assert (manifest["keep"].to_numpy(zero_copy_only=False) == expected).all()


def test_process_pool_gives_the_same_manifest_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAPRUNING_POOL_AFTER_S", "0")  # the pool from the first pass, however small the run
    inp = write_embedding_shards(tmp_path / "emb", n_shards=4, per_shard=200)
    args = ["embed.encoder=precomputed", "cluster.k=5", "cluster.partition_mib=1", *CASES["semdedup_dbp"]]
    run_pipeline(load_config(None, args), str(inp), tmp_path / "one")
    run_pipeline(load_config(None, args + ["workers=2"]), str(inp), tmp_path / "pool")
    for f in sorted((tmp_path / "one" / "manifest").glob("*.parquet")):
        assert f.read_bytes() == (tmp_path / "pool" / "manifest" / f.name).read_bytes()
    assert (tmp_path / "one" / "kept.parquet").read_bytes() == (tmp_path / "pool" / "kept.parquet").read_bytes()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cluster_partitions_hold_every_row_once_grouped_by_cluster(tmp_path, dtype):
    inp = write_embedding_shards(tmp_path / "emb", n_shards=3, per_shard=200, d=1024)
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=6", "cluster.partition_mib=1",
                             f"embed.store_dtype={dtype}"])
    run_pipeline(cfg, str(inp), tmp_path / "run", stages=("embed", "cluster"))
    run = Run(load_run_config(tmp_path / "run"), tmp_path / "run")
    groups = np.load(run.layout.groups)
    assert groups.max() >= 2  # several groups, so a shard's copy is sliced
    assert len(list(run.layout.parts.iterdir())) == 3 * 3  # emb, meta, idx per shard
    emb = pq.read_table(tmp_path / "run" / "embeddings")
    x = np.stack(emb["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    cl = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "run" / "clusters").glob("*.parquet")))
    offsets = np.array([0, 200, 400])
    seen = []
    for g in range(int(groups.max()) + 1):
        part = read_group(run, offsets, g)
        pos = part["pos"]
        seen.append(pos)
        assert (groups[part["cluster"]] == g).all()
        assert (np.lexsort((pos, part["cluster"])) == np.arange(len(pos))).all()  # sorted by (cluster, pos)
        assert (part["cluster"] == cl["cluster"].to_numpy()[pos]).all()
        assert (part["tie"] == cl["tie"].to_numpy()[pos]).all()
        assert (part["cos_dist"] == cl["cos_dist"].to_numpy()[pos]).all()
        assert (pos == offsets[part["shard"]] + part["row"]).all()
        np.testing.assert_array_equal(part["embedding"], x[pos])  # the stored precision, exactly
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(600))


def test_truncated_partition_names_the_file(tmp_path):
    inp = write_embedding_shards(tmp_path / "emb", n_shards=2, per_shard=100)
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=4"])
    run_pipeline(cfg, str(inp), tmp_path / "run", stages=("embed", "cluster"))
    run = Run(load_run_config(tmp_path / "run"), tmp_path / "run")
    victim = run.layout.parts / "00001.emb"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(StageError, match="00001.emb is truncated"):
        read_group(run, np.array([0, 100]), 0)


@pytest.mark.parametrize("batch", [10**9, 37])
def test_uid_check_finds_repeats_across_shards_in_any_hash_range(tmp_path, monkeypatch, batch):
    monkeypatch.setattr(unique, "UNIQUE_BATCH", batch)  # 37: 11 ranges over 400 hashes
    ranges = unique.hash_ranges(400, batch)
    assert ranges[0][0] == 0 and ranges[-1][1] is None
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(ranges, ranges[1:]))
    inp = write_embedding_shards(tmp_path / "emb", n_shards=2, per_shard=200)
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=4"])
    run_pipeline(cfg, str(inp), tmp_path / "ok", stages=("embed", "cluster"))  # unique uids pass
    for name, uids in (("00000", ["a", "b"]), ("00001", ["b", "a"])):
        t = pq.read_table(inp / f"{name}.parquet")
        t = t.set_column(0, "uid", pa.array([*uids, *t["uid"].to_pylist()[2:]]))
        pq.write_table(t, inp / f"{name}.parquet")
    with pytest.raises(StageError, match="duplicate uid across shards: a \\(and 1 more\\)"):
        run_pipeline(cfg, str(inp), tmp_path / "dup", stages=("embed", "cluster"))
    run = Run(load_run_config(tmp_path / "dup"), tmp_path / "dup")
    names = ["00000", "00001"]
    found = np.concatenate([unique.repeated_in(run, names, r) for r in ranges])
    assert len(found) == 2  # each repeated hash once, whichever range holds it
