"""Web-scale shapes stay in budget: histograms sized by the groups still open, d_inter computed once, one score
file per group (issue 27)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import datapruning.cutoffs as cutoffs
import datapruning.score.dbp as score_dbp
import datapruning.score.stage as score_stage
from datapruning.config import load_config
from datapruning.cutoffs import find_cutoffs, keep_mask
from datapruning.metrics.ranking import order_key
from datapruning.rows import ArrayRows
from datapruning.run import RunLayout
from datapruning.runner import run_pipeline


def _keys(block):
    return block["g"], order_key(block["s"], "hard"), block["tie"], block["pos"].astype(np.uint64)


def test_histograms_count_only_the_open_groups_and_stay_under_the_cap(monkeypatch):
    """10,000 long-tailed groups of which few need a cut: a pass holds (open groups x 2**bits) cells, never
    (all groups x 2**16); with more open groups than one pass can hold, several passes share the level."""
    rng = np.random.default_rng(0)
    G, n = 10_000, 60_000
    g = np.where(rng.random(n) < 0.8, rng.integers(0, 50, n), rng.integers(50, G, n))  # 80% in 50 classes
    s = rng.normal(size=n)
    rows = ArrayRows({"g": g, "s": s}, seed=1)
    quotas = np.full(G, 3)  # the 50 head classes (and the few tail ones above 3 rows) need a cut
    cells = []
    plain = cutoffs._hist
    monkeypatch.setattr(cutoffs, "_hist", lambda *a: (lambda h: cells.append(len(h)) or h)(plain(*a)))
    monkeypatch.setattr(cutoffs, "COLLECT_LIMIT", 100)
    for counters in (1 << 22, 64):
        cells.clear()
        monkeypatch.setattr(cutoffs, "COUNTERS", counters)
        got = keep_mask(find_cutoffs(rows, _keys, quotas), _keys, rows.block)
        assert cells and max(cells) <= counters
        order = np.lexsort((np.arange(n), rows.block["tie"], order_key(s, "hard")))
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)
        expected = np.zeros(n, bool)
        for grp in np.unique(g):
            rows_g = np.flatnonzero(g == grp)
            expected[rows_g[np.argsort(rank[rows_g])[:3]]] = True
        assert (got == expected).all()
    assert len(cells) > 10  # 64 cells: many passes per level


def shards(folder, n_shards=4, per_shard=250, d=512, crowd=0.0):
    """Random rows; a ``crowd`` share of them close to one point (one large cluster)."""
    rng = np.random.default_rng(2)
    folder.mkdir()
    for s in range(n_shards):
        x = rng.normal(size=(per_shard, d)).astype(np.float32)
        near = rng.random(per_shard) < crowd
        x[near] = 5.0 + 0.01 * x[near]
        pq.write_table(pa.table({"uid": [f"u{s}-{i}" for i in range(per_shard)],
                                 "embedding": pa.array(list(x), pa.list_(pa.float32(), d))}), folder / f"{s}.parquet")
    return folder


def test_d_inter_is_computed_once_and_scores_go_to_one_file_per_group(tmp_path, monkeypatch):
    calls, files = [], []
    plain = score_dbp.d_inter
    monkeypatch.setattr(score_dbp, "d_inter", lambda c, l: calls.append(l) or plain(c, l))
    plain_shards = score_stage.score_shards

    def spy(run, plan, labels, n_groups, batch):  # the group files present while shards are scored
        files.append(sorted(p.name for p in score_stage.parts_dir(run, "semdedup").iterdir()))
        return plain_shards(run, plan, labels, n_groups, batch)

    monkeypatch.setattr(score_stage, "score_shards", spy)
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=12", "cluster.partition_mib=1",
                             "score.metrics=[semdedup, dbp]", "select.method=dbp", "select.keep_fraction=0.3"])
    run_pipeline(cfg, str(shards(tmp_path / "emb")), tmp_path / "run")
    assert calls == [20]  # the score stage's DBP state; the select stage reused it
    layout = RunLayout(tmp_path / "run")
    groups = int(np.load(layout.groups).max()) + 1
    assert groups > 1 and files and all(f == [f"g{g:05d}.bin" for g in range(groups)] for f in files)
    assert layout.score_parts.parent.exists() and not layout.score_parts.exists()


def test_cluster_stage_in_small_chunks_writes_the_same_bytes(tmp_path, monkeypatch):
    """A shard read, assigned and partitioned a few rows at a time (runs merged in small steps, one cluster
    copied in pieces) gives the files of the whole-shard reading, byte for byte."""
    import datapruning.cluster.parts as parts
    import datapruning.cluster.stage as cluster_stage
    import datapruning.io.tables as tables

    inp = shards(tmp_path / "emb", n_shards=3, per_shard=300, d=16, crowd=0.4)
    args = ["embed.encoder=precomputed", "cluster.k=12", "cluster.niter=3", "score.metrics=[semdedup]",
            "select.method=rank", "select.metric=semdedup"]
    run_pipeline(load_config(None, args), str(inp), tmp_path / "whole")
    monkeypatch.setattr(tables, "BATCH_VALUES", 16 * 7)  # 7-row parquet batches
    monkeypatch.setattr(cluster_stage, "SHARD_CHUNK_BYTES", 4 * 16 * 40)  # chunks of about 40 rows
    monkeypatch.setattr(parts, "MERGE_BYTES", 4 * 16 * 30)  # merge steps of 30 rows: big clusters in pieces
    run_pipeline(load_config(None, args), str(inp), tmp_path / "chunked")
    sizes = [np.bincount(pq.read_table(f)["cluster"].to_numpy(), minlength=12)
             for f in sorted((tmp_path / "chunked" / "clusters").glob("*.parquet"))]
    assert max(c.max() for c in sizes) > 30  # a cluster copied in pieces ...
    assert any((c[:-1] + c[1:] <= 30).any() for c in sizes)  # ... and a merge step of several clusters
    layout = RunLayout(tmp_path / "whole")
    whole = sorted(p.relative_to(tmp_path / "whole") for folder in (layout.dir("cluster"), layout.parts, layout.ties)
                   for p in folder.rglob("*") if p.is_file() and p.suffix != ".json")  # the markers hold timings
    assert any(p.suffix == ".emb" for p in whole)
    for rel in whole:
        assert (tmp_path / "whole" / rel).read_bytes() == (tmp_path / "chunked" / rel).read_bytes(), rel
    assert (tmp_path / "whole" / "kept.parquet").read_bytes() == (tmp_path / "chunked" / "kept.parquet").read_bytes()


def test_nearest_settles_copies_of_an_unsure_row_once_with_the_same_choice():
    from datapruning.metrics.exact import dot_bound, exact_argmax, nearest, row_norms

    rng = np.random.default_rng(3)
    c = rng.normal(size=(6, 16)).astype(np.float32)
    c[1] = np.nextafter(c[0], np.float32(9))  # two centroids a few ulps apart: their rows are all unsure
    x = np.concatenate([np.repeat(c[:1] * 2, 500, axis=0), rng.normal(size=(300, 16)).astype(np.float32)])
    x[::7] = np.nextafter(x[::7], np.float32(-9))
    sims32 = x @ c.T
    top = np.argsort(-sims32, axis=1)[:, :2]
    got = nearest(x, c, top, np.take_along_axis(sims32, top, axis=1))
    cmax = float(row_norms(c).max())
    want = [exact_argmax(x[i], c, x[i].astype(np.float64) @ c.astype(np.float64).T,
                         float(dot_bound(16, row_norms(x[i:i + 1])[0], cmax))) for i in range(len(x))]
    np.testing.assert_array_equal(got, want)


def test_one_radix_search_gives_every_keep_fractions_eps(monkeypatch):
    """The five summary targets share one search; each equals its own search and keeps at least ceil(f * n)
    scored rows, its threshold 1 - eps being the ceil(f * n)-th smallest score."""
    from datapruning.metrics.semdedup import eps_for_keep_fraction, eps_for_keep_fractions, removal_mask
    from datapruning.rows import BlockRows

    monkeypatch.setattr(cutoffs, "COLLECT_LIMIT", 40)  # force the radix passes
    rng = np.random.default_rng(5)
    s = np.clip(1 - rng.exponential(0.02, 3000), -1, 1).astype(np.float32).astype(np.float64)
    s[rng.random(3000) < 0.2] = 1.0  # exact copies
    s[rng.random(3000) < 0.05] = np.nan  # unscored
    parts = np.array_split(np.arange(3000), 7)
    rows = BlockRows(lambda i: {"score_semdedup": s[parts[i]], "pos": parts[i].astype(np.int64),
                                "tie": np.arange(3000, dtype=np.uint64)[parts[i]] * np.uint64(2654435761)},
                     list(range(7)), 3000)
    fractions = (0.9, 0.8, 0.7, 0.6, 0.5)
    got = eps_for_keep_fractions(rows, fractions)
    n = int((~np.isnan(s)).sum())
    for f, eps in zip(fractions, got):
        assert eps == eps_for_keep_fraction(rows, f)
        want = int(np.ceil(f * n - 1e-9))
        kept = n - removal_mask(s, eps).sum()
        assert kept >= want  # keeps enough ...
        assert kept - np.sum(np.abs(s - (1 - eps)) < 1e-12) < want  # ... and the threshold is the want-th score
