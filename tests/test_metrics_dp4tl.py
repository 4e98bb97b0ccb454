"""DP4TL: label/feature mapping, top-K groups, readers, adapters and the whole-group selector."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

import datapruning.metrics.dp4tl as dp
from datapruning.score import METRICS
from datapruning.io.tables import read_embeddings
from datapruning.select import SELECTORS, select_groups
from datapruning.score.base import ScoreInputs
from datapruning.select import SelectInputs


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_feature_mapping_matches_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    cents = _unit(rng.normal(size=(7, 6)))
    target = rng.normal(size=(200, 6)).astype(np.float32) * rng.uniform(0.1, 10, (200, 1)).astype(np.float32)
    brute = np.array([np.argmax([t @ c / np.linalg.norm(t) for c in cents]) for t in target])
    monkeypatch.setattr(dp, "BLOCK_ELEMS", 20)  # several row blocks
    got = dp.feature_mapping_assign(target, cents)
    np.testing.assert_array_equal(got, brute)
    # targets placed next to centroid j map to j (the reference bug sends them all to 0)
    near = cents[[3, 1, 6, 6]] + 0.01 * rng.normal(size=(4, 6)).astype(np.float32)
    assert dp.feature_mapping_assign(near, cents).tolist() == [3, 1, 6, 6]
    assert dp.feature_mapping_freq(dp.feature_mapping_assign(near, cents), 7).tolist() == [0, 1, 0, 1, 0, 0, 2]
    with pytest.raises(ValueError):
        dp.feature_mapping_assign(target[:, :3], cents)


def test_label_mapping_predictions_and_freq():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 9.0, 1.0]])
    pred = dp.lm_predictions_from_logits(logits)
    assert pred.tolist() == [1, 0, 2, 1]
    assert dp.label_mapping_freq(pred, 4).tolist() == [1, 2, 1, 0]
    with pytest.raises(ValueError):
        dp.label_mapping_freq(pred, 2)
    with pytest.raises(ValueError):
        dp.lm_predictions_from_logits(np.zeros(3))


def test_zero_shot_uses_cosine_not_raw_dot():
    text = np.array([[100.0, 0.0], [1.0, 1.0]], np.float32)
    target = np.array([[0.6, 0.8], [1.0, 0.0]], np.float32)
    assert dp.zero_shot_predictions(target, text).tolist() == [1, 0]


def test_linear_source_classifier_learns_and_is_deterministic():
    rng = np.random.default_rng(0)
    means = _unit(rng.normal(size=(4, 16))) * 3
    labels = rng.integers(0, 4, 800)
    x = _unit(means[labels] + rng.normal(size=(800, 16)))
    clf = dp.train_linear_source_classifier(x, labels, seed=1, epochs=10)
    assert (clf.predict(x) == labels).mean() > 0.9  # nearest-mean (Bayes-like) accuracy here is ~0.96
    again = dp.train_linear_source_classifier(x, labels, seed=1, epochs=10)
    np.testing.assert_array_equal(clf.weight, again.weight)
    with pytest.raises(ValueError):
        dp.train_linear_source_classifier(x, -np.ones(800, np.int64))


def test_top_k_groups_orders_by_hits_and_prunes_zero_hits_first():
    freq = np.array([3, 0, 5, 3, 0])
    assert dp.top_k_groups(freq, k=2)[0].tolist() == [2, 0]
    assert dp.top_k_groups(freq, keep_fraction=0.6)[0].tolist() == [2, 0, 3]
    kept, info = dp.top_k_groups(freq, k=4)
    assert kept.tolist() == [2, 0, 3, 1] and info["zero_hit_groups"] == 2
    sizes = np.array([10, 5, 20, 10, 1])
    kept, info = dp.top_k_groups(freq, sample_budget=30, group_sizes=sizes)
    assert kept.tolist() == [2, 0] and info["samples_kept"] == 30
    assert dp.top_k_groups(freq, sample_budget=29, group_sizes=sizes)[0].tolist() == [2]  # never split or exceed
    assert dp.top_k_groups(freq, sample_budget=5, group_sizes=sizes)[1]["samples_kept"] == 0
    assert dp.top_k_groups(freq, sample_budget=1000, group_sizes=sizes)[1]["groups_kept"] == 5
    for bad in ({}, {"k": 1, "keep_fraction": 0.5}, {"sample_budget": 3}, {"keep_fraction": 2.0}):
        with pytest.raises(ValueError):
            dp.top_k_groups(freq, **bad)


def test_read_embeddings_npy_parquet_and_folder(tmp_path):
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "t.npy", emb)
    got, uid = read_embeddings(tmp_path / "t.npy")
    assert uid is None and (got == emb).all()
    folder = tmp_path / "emb"
    folder.mkdir()
    for i, rows in enumerate([slice(0, 3), slice(3, 4)]):
        table = pa.table({"uid": [f"u{j}" for j in range(4)][rows], "embedding": [list(r) for r in emb[rows]]})
        pq.write_table(table, folder / f"{i:05d}.parquet")
    got, uid = read_embeddings(folder)
    assert (got == emb).all() and got.dtype == np.float32 and uid.tolist() == ["u0", "u1", "u2", "u3"]
    got, _ = read_embeddings(folder / "00000.parquet")
    assert got.shape == (3, 3)


def _source(seed=0, n=400, k=4, d=8):
    rng = np.random.default_rng(seed)
    cents = _unit(rng.normal(size=(k, d)))
    labels = rng.integers(0, k, n)
    x = _unit(cents[labels] * 4 + rng.normal(size=(n, d)))
    cos = (1 - np.einsum("ij,ij->i", x, cents[labels])).astype(np.float32)
    return ScoreInputs(uid=np.arange(n).astype(str), embeddings=x, cluster=labels, cos_dist=cos, centroids=cents,
                       labels=labels, seed=seed)


def test_lm_adapter_routes(tmp_path):
    inp = _source()
    rng = np.random.default_rng(5)
    tgt_lab = np.r_[np.zeros(30, int), np.full(10, 2)]  # the target looks like source classes 0 and 2
    target = _unit(inp.centroids[tgt_lab] * 4 + 0.5 * rng.normal(size=(40, 8)))
    np.save(tmp_path / "target.npy", target)
    np.save(tmp_path / "text.npy", inp.centroids)
    logits = np.eye(4)[tgt_lab] * 5
    np.save(tmp_path / "logits.npy", logits)
    expect = np.array([30, 0, 10, 0])
    out = METRICS["dp4tl_lm"](inp, route="logits", logits=str(tmp_path / "logits.npy"))
    assert out.info["freq"] == expect.tolist() and (out.scores == expect[inp.labels]).all()
    out = METRICS["dp4tl_lm"](inp, target=str(tmp_path / "target.npy"), route="zeroshot",
                              class_text=str(tmp_path / "text.npy"))
    assert out.info["freq"] == expect.tolist() and out.info["zero_hit_groups"] == 2
    out = METRICS["dp4tl_lm"](inp, target=str(tmp_path / "target.npy"), route="linear", epochs=10)
    assert out.info["freq"] == expect.tolist()
    with pytest.raises(ValueError):
        METRICS["dp4tl_lm"](inp, route="logits")
    with pytest.raises(ValueError):
        METRICS["dp4tl_lm"](inp, target=str(tmp_path / "target.npy"), route="bogus")
    with pytest.raises(ValueError):  # classifier with fewer classes than the labels
        np.save(tmp_path / "small.npy", logits[:, :2])
        METRICS["dp4tl_lm"](inp, route="logits", logits=str(tmp_path / "small.npy"))
    with pytest.raises(ValueError):
        METRICS["dp4tl_lm"](ScoreInputs(**{**inp.__dict__, "labels": None}), route="logits",
                            logits=str(tmp_path / "logits.npy"))


def test_fm_adapter_scores_cluster_hits(tmp_path):
    inp = _source(1)
    target = inp.centroids[[1, 1, 1, 3]] + 0.01
    np.save(tmp_path / "t.npy", target)
    out = METRICS["dp4tl_fm"](inp, target=str(tmp_path / "t.npy"))
    assert out.info["freq"] == [0, 3, 0, 1]
    np.testing.assert_array_equal(out.scores, np.array([0, 3, 0, 1])[inp.cluster])


def _groups_input(seed=0, n=200, g=6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, g, n)
    hits = rng.integers(0, 5, g)
    return SelectInputs(uid=np.arange(n).astype(str), cluster=(labels + 1) % g, cos_dist=np.zeros(n, np.float32),
                        centroids=np.zeros((g, 2), np.float32), scores={"dp4tl_lm": hits[labels].astype(float)},
                        labels=labels, seed=seed), hits


def test_select_groups_keeps_whole_top_groups_within_budget():
    inp, hits = _groups_input()
    keep, info = SELECTORS["groups"](inp, 90, metric="dp4tl_lm", by="label")
    sizes = np.bincount(inp.labels, minlength=6)
    order = np.lexsort((np.arange(6), -hits))
    k = int(np.sum(np.cumsum(sizes[order]) <= 90))
    assert sorted(info["kept_ids"]) == sorted(order[:k].tolist())
    assert keep.sum() == info["samples_kept"] == sizes[order[:k]].sum() <= 90
    keep2, info2 = SELECTORS["groups"](inp, 0, by="label", keep_fraction_groups=0.5)
    assert info2["kept_ids"] == order[:3].tolist() and keep2.sum() == sizes[order[:3]].sum()
    with pytest.raises(ValueError):
        SELECTORS["groups"](inp, 10, by="shard")
    with pytest.raises(ValueError):
        SELECTORS["groups"](SelectInputs(**{**inp.__dict__, "labels": None}), 10, by="label")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 250), st.sampled_from(["label", "cluster"]))
def test_select_groups_properties(seed, n, by):
    inp, _ = _groups_input(seed)
    eligible = np.random.default_rng(seed + 1).random(200) < 0.8
    inp = SelectInputs(**{**inp.__dict__, "eligible": eligible})
    keep, info = select_groups(inp, n, by=by)
    groups = inp.labels if by == "label" else inp.cluster
    assert keep.sum() <= n and not (keep & ~eligible).any()
    for gid in np.unique(groups):  # whole groups: all eligible rows of a group, or none
        rows = (groups == gid) & eligible
        assert keep[rows].all() or not keep[rows].any()
    assert (keep == select_groups(inp, n, by=by)[0]).all()


def _labelled_run(tmp_path, labels, n=60, d=8):
    """A precomputed-embedding parquet input whose label column holds ``labels`` (cycled)."""
    rng = np.random.default_rng(3)
    x = _unit(rng.normal(size=(n, d))).astype(np.float32)
    lab = [labels[i % len(labels)] for i in range(n)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"uid": [f"u{i:03d}" for i in range(n)], "embedding": pa.array(list(x), pa.list_(pa.float32())),
                             "label": lab}), tmp_path / "in" / "part-000.parquet")
    return lab


def _run_lm(tmp_path, extra):
    from datapruning.config import load_config
    from datapruning.runner import run_pipeline

    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=3", "score.metrics=[dp4tl_lm]",
                             "score.params.dp4tl_lm.route=logits",
                             f"score.params.dp4tl_lm.logits={tmp_path / 'logits.npy'}", *extra])
    run_pipeline(cfg, str(tmp_path / "in"), tmp_path / "run", stages=("embed", "cluster", "score"))
    table = pq.read_table(tmp_path / "run" / "scores")
    emb = pq.read_table(tmp_path / "in", columns=["uid", "label"])
    by_uid = dict(zip(table["uid"].to_pylist(), table["score_dp4tl_lm"].to_pylist()))
    return {str(lab): by_uid[u] for u, lab in zip(emb["uid"].to_pylist(), emb["label"].to_pylist())}


def test_lm_integer_labels_are_classifier_columns_through_the_pipeline(tmp_path):
    """Source labels {3, 17, 999}, a 1000-column classifier: label c is column c (issue 12 item 1)."""
    _labelled_run(tmp_path, [3, 17, 999])
    logits = np.zeros((30, 1000), np.float32)
    logits[np.arange(30), np.r_[np.full(20, 17), np.full(10, 999)]] = 5.0  # 20 targets -> 17, 10 -> 999, 0 -> 3
    np.save(tmp_path / "logits.npy", logits)
    assert _run_lm(tmp_path, []) == {"3": 0.0, "17": 20.0, "999": 10.0}


def test_lm_string_labels_are_matched_to_columns_by_name(tmp_path):
    """String labels whose sorted order is not the classifier's column order: matched by name, or refused."""
    _labelled_run(tmp_path, ["zebra", "ant", "moth"])
    columns = ["zebra", "cat", "moth", "ant"]  # column order of the user's classifier
    logits = np.zeros((7, 4), np.float32)
    logits[np.arange(7), [0, 0, 0, 0, 2, 2, 1]] = 3.0  # 4 -> zebra, 2 -> moth, 1 -> cat, 0 -> ant
    np.save(tmp_path / "logits.npy", logits)
    with pytest.raises(ValueError, match="classes"):
        _run_lm(tmp_path, [])
    (tmp_path / "classes.txt").write_text("\n".join(columns) + "\n")
    import shutil

    shutil.rmtree(tmp_path / "run")
    got = _run_lm(tmp_path, [f"score.params.dp4tl_lm.classes={tmp_path / 'classes.txt'}"])
    assert got == {"zebra": 4.0, "ant": 0.0, "moth": 2.0}
