"""Pruning-curve evaluation on a run with planted structure: separable classes plus injected label noise."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datapruning import cli
from datapruning.config import load_config
from datapruning.evaluation.curves import Variant, default_variants, evaluate_curves, format_table, recommend, run_eval
from datapruning.evaluation.confidence import TEACHERS
from datapruning.evaluation.data import load_eval_data
from datapruning.evaluation.probe import probe_accuracy, stratified_split
from datapruning.runner import run_pipeline
from datapruning.select import keep_count

N_PER_SHARD, N_SHARDS, CLASSES, DIM, NOISE = 120, 4, 4, 16, 0.25
FRACTIONS = (0.1, 0.2, 0.5, 0.9, 1.0)
METRICS = ("ssp", "random", "el2n", "dbp", "semdedup", "dp4tl_fm")


def planted_shards(folder, seed: int = 0):
    """Four well-separated classes; a quarter of the rows are a clean test split; a quarter of the training
    rows get a wrong label. Returns (paths, truth, noisy mask, split)."""
    rng = np.random.default_rng(seed)
    n = N_PER_SHARD * N_SHARDS
    centres = np.linalg.qr(rng.normal(size=(DIM, CLASSES)))[0].T  # orthonormal class directions
    truth = rng.integers(CLASSES, size=n)
    x = centres[truth] + 0.25 * rng.normal(size=(n, DIM)) / np.sqrt(DIM)
    split = np.where(rng.random(n) < 0.25, "test", "train")
    noisy = (split == "train") & (rng.random(n) < NOISE)
    labels = truth.copy()
    labels[noisy] = (truth[noisy] + rng.integers(1, CLASSES, size=noisy.sum())) % CLASSES
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(N_SHARDS):
        rows = slice(s * N_PER_SHARD, (s + 1) * N_PER_SHARD)
        path = folder / f"part-{s:03d}.parquet"
        pq.write_table(pa.table({"uid": [f"u{i:05d}" for i in range(rows.start, rows.stop)],
                                 "embedding": pa.array(list(x[rows].astype(np.float32)), pa.list_(pa.float32())),
                                 "label": labels[rows], "split": split[rows]}), path)
        paths.append(path)
    target = folder.parent / "target.parquet"  # DP4TL feature mapping: downstream data = classes 0 and 1
    pick = np.flatnonzero(truth < 2)[:40]
    pq.write_table(pa.table({"embedding": pa.array(list(x[pick].astype(np.float32)), pa.list_(pa.float32()))}),
                   target)
    return paths, truth, noisy, split, target


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    paths, truth, noisy, split, target = planted_shards(root / "emb")
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=4", f"score.metrics={','.join(METRICS)}",
                             f"score.params.dp4tl_fm.target={target}", "select.keep_fraction=0.5"])
    run_pipeline(cfg, str(paths[0].parent), root / "run")
    return root / "run", split


@pytest.fixture(scope="module")
def planted_eval(planted_run):
    run, _ = planted_run
    return run_eval(run, fractions=FRACTIONS, seeds=3, tolerance=0.01)


def test_table_has_every_cell(planted_run, planted_eval):
    run, split = planted_run
    table, summary = planted_eval["table"], planted_eval["summary"]
    expected = {"ssp/hard", "ssp/easy", "ssp/ccs", "ssp/hard+balanced", "el2n/hard", "el2n/easy", "el2n/ccs",
                "el2n/hard+balanced", "dbp/hard", "dbp/easy", "semdedup", "semdedup→dbp/hard", "semdedup→el2n/ccs",
                "dp4tl_fm", "random", "random+balanced", "config: rank ssp hard"}
    kd = set(table.loc[table["kd"], "variant"])
    assert set(table["variant"]) == expected | kd and "random+kd" in kd and len(kd) == 3  # kd=auto: random + best 2
    assert len(table) == len(expected | kd) * len(FRACTIONS)
    for name, part in table.groupby("variant"):
        assert sorted(part["fraction"]) == list(FRACTIONS), name
    assert table["accuracy"].between(0, 1).all() and table.drop(columns="kd").notna().all().all()
    assert (table["acc_lo"] <= table["accuracy"] + 1e-9).all() and (table["accuracy"] <= table["acc_hi"] + 1e-9).all()
    # the held-out side is the split column, never pruned; selection only ever sees training rows
    n_train = int((split == "train").sum())
    assert summary["split"].startswith("split column") and summary["test_rows"] == int((split == "test").sum())
    assert summary["train_rows"] == n_train
    assert summary["sample"]["rows"] == summary["sample"]["labelled_rows"] == len(split)
    assert (table["sample_rows"] == len(split)).all()
    exact = table[table["selector"].isin(["rank", "ccs", "dbp"]) & ~table["variant"].str.startswith("semdedup→")]
    assert (exact["kept"] == [keep_count(n_train, f, None) for f in exact["fraction"]]).all()
    assert (table.loc[table["selector"] == "groups", "kept"] <= table.loc[table["selector"] == "groups", "fraction"]
            * n_train + 0.5).all()
    # random is repeated: seeds recorded, a spread somewhere below 1.0, none at 1.0 (all rows kept)
    rnd = table[table["variant"] == "random"].set_index("fraction")
    assert (rnd["seeds"] == 3).all() and rnd.loc[0.1, "accuracy_std"] > 0 and rnd.loc[1.0, "accuracy_std"] == 0
    # every curve without KD reaches the same full-data accuracy at 1.0
    assert np.allclose(table.loc[(table["fraction"] == 1.0) & ~table["kd"], "accuracy"], summary["full_accuracy"])
    stored = pd.read_parquet(run / "eval" / "curves.parquet")
    pd.testing.assert_frame_equal(stored, table, check_dtype=False)
    assert (run / "eval" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recommended_yaml_is_a_runnable_config(planted_eval):
    """recommended.yaml loads as a `datapruning run` config whose select block makes the recommended recipe."""
    summary = planted_eval["summary"]
    rec = summary["recommended"]
    assert rec["variant"] == summary["variant"] and rec["fraction"] == summary["fraction"] < 1
    cfg = load_config(rec["config"])
    assert cfg.select.keep_fraction == summary["fraction"]
    variant = next(v for v in summary["curves"] if v["name"] == summary["variant"])
    assert cfg.select.method == variant["selector"]
    text = open(rec["config"]).read()
    assert text.startswith("# datapruning eval recommendation") and "datapruning run" in text
    assert ("--kd" in text) == variant["kd"]
    header = [line for line in text.splitlines() if line.startswith("#")]
    with_kd = next(line for line in header if line.startswith("# with KD, which presumes a teacher trained on all"))
    without = next(line for line in header if line.startswith("# without KD: "))
    for line, side in ((with_kd, summary["with_kd"]), (without, summary["without_kd"])):
        if side["variant"] is not None:
            assert f"keep {side['fraction']:g} with {side['variant']}, probe accuracy {side['accuracy']:.3f} " \
                   f"[{side['acc_lo']:.3f}, {side['acc_hi']:.3f}]" in line
    if variant["kd"] and summary["without_kd"]["variant"] is not None:  # the no-KD recipe, ready to paste
        block = load_config(None, [], base={"select": rec["without_kd_select"]}).select
        assert block.keep_fraction == summary["without_kd"]["fraction"] and "its select block: {select: " in text


def test_recommended_yaml_of_a_kd_recipe_names_the_recipe_without_kd(planted_run, planted_eval, tmp_path):
    """When the recommendation distils, recommended.yaml says so, names the teacher it presumes and carries the
    best recipe without KD as a one-line select block; the file still loads as a config."""
    from datapruning.evaluation.kd import KDSettings
    from datapruning.evaluation.recommended import write_recommended

    table, summary = planted_eval["table"], planted_eval["summary"]
    plain = table["variant"] == "semdedup→el2n/ccs"  # a long select block (dedup, ccs params)
    rec = recommend(table[table["kd"] | (plain & (table["fraction"] >= 0.5))], summary["full_accuracy"], 1.0)
    assert rec["variant"].endswith("+kd") and rec["without_kd"]["fraction"] == 0.5
    variants = {v["name"]: Variant(**v) for v in summary["curves"]}
    out = write_recommended(planted_run[0], tmp_path / "r.yaml", variants, rec, KDSettings())
    text = (tmp_path / "r.yaml").read_text()
    assert load_config(str(tmp_path / "r.yaml")).select.keep_fraction == rec["fraction"]
    assert "# with KD, which presumes a teacher trained on all the data (in this eval: the probe fitted" in text
    plain = rec["without_kd"]
    assert f"# without KD: keep 0.5 with {plain['variant']}, probe accuracy {plain['accuracy']:.3f}" in text
    header = text[:text.index("\nseed:")].splitlines()
    assert all(line.startswith("#") for line in header) and any("its select block: {select: " in h for h in header)
    assert load_config(None, [], base={"select": out["without_kd_select"]}).select.method == "ccs"


def test_planted_noise_keep_easy_and_ccs_beat_keep_hard(planted_eval):
    """EL2N's hardest rows are the mislabelled ones: keeping only them at small fractions ruins the probe,
    while CCS (which drops the hardest first) stays near the full-data accuracy."""
    acc = planted_eval["table"].set_index(["variant", "fraction"])["accuracy"]
    full = planted_eval["summary"]["full_accuracy"]
    for f in (0.1, 0.2):
        assert acc["el2n/ccs", f] > acc["el2n/hard", f] + 0.5, (f, acc["el2n/ccs", f], acc["el2n/hard", f])
        assert acc["el2n/ccs", f] > full - 0.1
        assert acc["el2n/easy", f] > acc["el2n/hard", f], (f, acc["el2n/easy", f], acc["el2n/hard", f])
    assert acc["el2n/hard", 0.1] < 0.3  # it learned the wrong labels
    assert acc["el2n/hard", 0.9] > full - 0.05  # with most rows kept, the noise is outvoted again


def expected_recommendation(table: pd.DataFrame, full: float, tol: float):
    ok = table[(table["fraction"] < 1) & (table["diff_lo"] >= -tol - 1e-12)]
    if ok.empty:
        return 1.0, None
    f = ok["fraction"].min()
    return f, ok.loc[ok["fraction"] == f, "accuracy"].max()


def test_recommendation_is_computed_from_the_lower_bounds(planted_eval):
    """The recommendation, and the best recipes with and without KD it names (issue 21: the KD twin presumes a
    teacher trained on all the data), each from the lower bounds of their own curves."""
    table, summary = planted_eval["table"], planted_eval["summary"]
    full = summary["full_accuracy"]
    assert (summary["fraction"], summary.get("accuracy")) == expected_recommendation(table, full, 0.01)
    for tol in (0.0, 0.005, 0.02, 0.05, 0.2, 1.0):
        rec = recommend(table, full, tol)
        frac, best = expected_recommendation(table, full, tol)
        assert rec["fraction"] == frac and rec.get("accuracy") == best
        for side, rows in (("with_kd", table[table["kd"]]), ("without_kd", table[~table["kd"]])):
            assert (rec[side]["fraction"], rec[side].get("accuracy")) == expected_recommendation(rows, full, tol)
            named = f"keep {rec[side]['fraction']:.0%} with {rec[side]['variant']}, " if rec[side]["variant"] else \
                "keep all the data (no curve's lower bound"
            said = (f"with KD, which needs a teacher trained on all the data (in this eval: {TEACHERS['probe']}): "
                    if side == "with_kd" else "without KD: ")
            assert said + named in rec["line"]
        if rec["variant"] is not None:
            assert rec["line"].startswith(f"recommendation: keep {frac:.0%}")
            rnd = table[(table["variant"] == "random") & (table["fraction"] == frac)].iloc[0]
            row = table[(table["variant"] == rec["variant"]) & (table["fraction"] == frac)].iloc[0]
            assert rec["beats_random"] == (row["acc_lo"] > rnd["acc_hi"] and rec["variant"] != "random")
            assert ("beats random" in rec["line"]) == rec["beats_random"]
    # a mean inside the tolerance is not enough: the lower bound must be
    wide = table.assign(accuracy=full, diff_lo=np.where(table["fraction"] < 1, -0.05, 0.0))
    assert recommend(wide, full, 0.01)["variant"] is None
    assert recommend(wide, full, 0.06)["fraction"] == min(FRACTIONS)


def test_cli_prints_table_and_recommendation(planted_run, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(planted_run[0], run)
    assert cli.main(["eval", str(run), "--seeds", "2", "--fractions", "0.2,1", "--tolerance", "0.02", "--kd", "none",
                     "--curves", "el2n/ccs,random,random+kd"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["line"] in out and "random" in out and "el2n/ccs" in out and "0.2" in out
    assert f"sample: {summary['sample']['rows']} of" in out
    assert summary["fractions"] == [0.2, 1.0] and summary["seeds"] == 2
    table = pd.read_parquet(run / "eval" / "curves.parquet")
    assert (summary["fraction"], summary.get("accuracy")) == expected_recommendation(
        table, summary["full_accuracy"], 0.02)


def test_one_line_errors(planted_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(planted_run[0], run)
    assert cli.main(["eval", str(run), "--label-column", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "labels" in err and "'nope'" in err and len(err.splitlines()) == 1
    for marker in (run / "_meta" / "scores").glob("_part-001.done.json"):
        marker.unlink()
    assert cli.main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "score" in err and "part-001" in err and len(err.splitlines()) == 1
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_unlabelled_run_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(3)
    (tmp_path / "emb").mkdir()
    pq.write_table(pa.table({"uid": [f"a{i}" for i in range(30)],
                             "embedding": pa.array(list(rng.normal(size=(30, 8)).astype(np.float32)),
                                                   pa.list_(pa.float32()))}), tmp_path / "emb" / "p.parquet")
    run_pipeline(load_config(None, ["embed.encoder=precomputed", "cluster.k=2"]), str(tmp_path / "emb"),
                 tmp_path / "run")
    assert cli.main(["eval", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs labels" in err and len(err.splitlines()) == 1


def test_stratified_split_and_probe():
    labels = np.repeat([0, 1, 2, 3], [50, 20, 5, 1])
    test = stratified_split(labels, 0.2, seed=0)
    assert [int(test[labels == c].sum()) for c in range(4)] == [10, 4, 1, 0]  # a singleton stays in training
    assert np.array_equal(test, stratified_split(labels, 0.2, seed=0))
    assert not np.array_equal(test, stratified_split(labels, 0.2, seed=1))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) + np.repeat(np.eye(5)[:2] * 4, 100, axis=0)
    y = np.repeat([0, 1], 100)
    a = probe_accuracy(x[::2], y[::2], x[1::2], y[1::2])
    assert a > 0.95 and a == probe_accuracy(x[::2], y[::2], x[1::2], y[1::2])  # deterministic
    assert probe_accuracy(x[:10], y[:10], x[100:], y[100:]) == 0.0  # one class seen: predicts it
    assert probe_accuracy(x[:0], y[:0], x, y) == 0.0


def test_variants_follow_the_run_metrics():
    names = [v.name for v in default_variants(["ssp", "random"], None, seeds=4, has_labels=False)]
    assert names == ["ssp/hard", "ssp/easy", "ssp/ccs", "random"]
    cfg = load_config(None, ["select.method=dbp", "select.params={tau: 0.2}"])
    variants = {v.name: v for v in default_variants(["ssp", "random", "semdedup"], cfg.select, seeds=4)}
    assert variants["dbp/easy"].params == {"tau": 0.2, "mode": "easy"} and variants["random"].seeds == 4
    assert variants["config: dbp cos_dist hard"].selector == "dbp"  # DBP orders by cos_dist
    assert variants["semdedup→dbp/hard"].dedup == 0.9 and variants["ssp/ccs"].seeds == 4
    assert variants["ssp/hard"].seeds == 1 and variants["ssp/hard"].with_kd().name == "ssp/hard+kd"


def test_sample_is_bounded_stratified_and_seeded(planted_run):
    """--max-rows: a label-stratified sample by the seeded uid hash, the same rows every time."""
    full = load_eval_data(planted_run[0])
    a, b = load_eval_data(planted_run[0], max_rows=200), load_eval_data(planted_run[0], max_rows=200)
    assert len(a.uid) == 200 and a.labelled_rows == len(full.uid) == N_PER_SHARD * N_SHARDS
    np.testing.assert_array_equal(a.uid, b.uid)
    share = np.bincount(a.labels, minlength=CLASSES) / 200
    np.testing.assert_allclose(share, np.bincount(full.labels, minlength=CLASSES) / len(full.uid), atol=0.01)
    where = {u: i for i, u in enumerate(full.uid)}
    rows = np.array([where[u] for u in a.uid])
    assert (np.diff(rows) > 0).all()  # row order
    np.testing.assert_array_equal(a.embeddings, full.embeddings[rows])
    np.testing.assert_array_equal(a.cluster, full.cluster[rows])
    for m in ("ssp", "semdedup"):
        np.testing.assert_array_equal(a.scores[m], full.scores[m][rows])


def test_probe_converges_and_picks_l2_on_validation():
    from datapruning.evaluation.probe import ProbeSettings, Teacher, fit_probe

    rng = np.random.default_rng(0)
    y = rng.integers(3, size=300)
    x = (np.eye(8)[y] * 1.5 + rng.normal(size=(300, 8))).astype(np.float32)
    a = fit_probe(x, y, ProbeSettings())
    assert a.info["converged"] and a.info["l2"] in ProbeSettings().l2_grid and a.info["val_accuracy"]
    b = fit_probe(x, y, ProbeSettings())
    np.testing.assert_array_equal(a.W, b.W)  # deterministic
    kd = fit_probe(x, y, ProbeSettings(l2_grid=(1e-3,)), Teacher(a.logits(x), alpha=1.0, T=2.0))
    assert (kd.predict(x) == a.predict(x)).mean() > 0.95  # pure KD follows the teacher


def test_a_fraction_the_selector_refuses_is_an_empty_cell(planted_run):
    """CCS with beta=0.95 cannot keep half the rows: that cell is NaN (and never recommended), not a crash."""
    data = load_eval_data(planted_run[0])
    bad = Variant("el2n/ccs95", "el2n", "ccs", "ccs", {"metric": "el2n", "beta": 0.95})
    table, full = evaluate_curves(data, [bad], (0.02, 0.5, 1.0))
    acc = table.set_index("fraction")["accuracy"]
    assert np.isfinite(acc[0.02]) and np.isnan(acc[0.5]) and np.isnan(acc[1.0])
    assert "n/a" in format_table(table)
    rec = recommend(table, full, 1.0)
    assert rec["fraction"] == 0.02


def test_el2n_curves_never_see_held_out_labels():
    """The proxy EL2N used for the curves is trained on training rows only: changing held-out labels
    changes nothing, while the run's own scores (all labelled rows) would."""
    from types import SimpleNamespace

    from datapruning.config import load_config
    from datapruning.evaluation.data import _el2n_without_heldout

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    labels = rng.integers(3, size=120)
    test = np.arange(120) % 4 == 0
    run = SimpleNamespace(cfg=load_config(None, ["score.params.el2n.epochs=3"]))
    a = _el2n_without_heldout(run, x, labels, test, None)
    flipped = labels.copy()
    flipped[test] = (flipped[test] + 1) % 3
    b = _el2n_without_heldout(run, x, flipped, test, None)
    np.testing.assert_array_equal(a[~test], b[~test])
    assert np.isnan(a[test]).all() and np.isfinite(a[~test]).all()


def test_kd_from_cached_teacher(planted_run, tmp_path, capsys):
    """`eval --teacher cached` distils from the logits `datapruning teacher RUN --all` stored, not from the probe:
    with a cached teacher that is always one class off, the distilled student follows it, while the probe teacher's
    student is right; the plain curve is the same fit either way; missing teacher output is a one-line error."""
    from datapruning.evaluation.kd import cached_teacher_logits
    from datapruning.labels import label_coding

    run = tmp_path / "run"
    shutil.copytree(planted_run[0], run)
    args = ["eval", str(run), "--seeds", "1", "--fractions", "0.2,1", "--kd", "none", "--kd-alpha", "0.9",
            "--curves", "el2n/hard,el2n/hard+kd"]
    assert cli.main([*args, "--teacher", "cached"]) == 2
    err = capsys.readouterr().err.strip()
    assert "datapruning teacher" in err and "--all" in err and len(err.splitlines()) == 1
    _, truth, _, _, _ = planted_shards(tmp_path / "again")  # the same seeded rows: their true labels
    uids = [f"u{i:05d}" for i in range(len(truth))]
    off = (truth + 1) % CLASSES
    wrong = (8.0 * np.eye(CLASSES)[off]).astype(np.float32)
    pq.write_table(pa.table({"uid": uids, "logits": pa.array(list(wrong), pa.list_(pa.float32()))}),
                   tmp_path / "wrong.parquet")
    assert cli.main(["teacher", str(run), "--source", "logits", "--logits", str(tmp_path / "wrong.parquet"),
                     "--all"]) == 0
    capsys.readouterr()
    coding = label_coding({str(c) for c in range(CLASSES)})
    stored = cached_teacher_logits(run, np.array(uids[::-1], dtype=object), coding)  # looked up by uid
    np.testing.assert_array_equal(stored.argmax(1), off[::-1])
    accuracy = {}
    for teacher in ("probe", "cached"):
        assert cli.main([*args, "--teacher", teacher]) == 0
        summary = json.loads((run / "eval" / "summary.json").read_text())
        assert summary["kd"]["teacher"] == teacher and summary["kd"]["alpha"] == 0.9
        table = pd.read_parquet(run / "eval" / "curves.parquet").set_index(["variant", "fraction"])["accuracy"]
        accuracy[teacher] = table
    assert accuracy["cached"][("el2n/hard", 0.2)] == accuracy["probe"][("el2n/hard", 0.2)]  # no KD: same fit
    assert accuracy["probe"][("el2n/hard+kd", 0.2)] > 0.9 and accuracy["cached"][("el2n/hard+kd", 0.2)] < 0.3
    for part in (run / "teacher").glob("*.parquet"):  # a teacher that lacks rows of the sample is refused
        part.unlink()
        break
    assert cli.main([*args, "--teacher", "cached"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no logits for" in err and len(err.splitlines()) == 1


@pytest.mark.slow  # two spawned workers import torch: 7 s at load average 2-4, 45 s at 8 (shared 2-core VM)
def test_fits_in_worker_processes_give_the_same_table(planted_run):
    """The probe fits run in two spawned workers or in this process: the same table, bit for bit, KD included."""
    from datapruning.evaluation.fits import CurveFitter
    from datapruning.evaluation.kd import KDSettings
    from datapruning.evaluation.probe import ProbeSettings

    data = load_eval_data(planted_run[0])
    variants = [v for v in default_variants(sorted(data.scores), None, 2) if v.name == "random"]
    variants += [variants[0].with_kd()]
    tables = []
    for workers in (1, 2):
        with CurveFitter(data, ProbeSettings(seed=data.seed), KDSettings(), workers=workers) as fitter:
            tables.append(evaluate_curves(data, variants, (0.2, 1.0), fitter=fitter)[0])
            assert fitter.workers == workers and (fitter._pool is not None) == (workers > 1)
    pd.testing.assert_frame_equal(tables[0], tables[1])


def test_probe_gradient_equals_autograd():
    """The probe's linear layer computes dW as (g^T x)^T; it must equal autograd's x^T g, KD term included."""
    import torch

    from datapruning.evaluation import probe as pm

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 24, generator=gen), torch.randint(0, 5, (500,), generator=gen)
    soft = torch.softmax(torch.randn(500, 5, generator=gen), 1)
    grads = []
    for linear in (pm._linear().apply, lambda x, W, b: torch.addmm(b, x, W)):
        W = (0.1 * torch.randn(24, 5, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
        b = torch.zeros(5, requires_grad=True)
        logits = linear(x, W, b)
        loss = torch.nn.functional.cross_entropy(logits, y) * 0.5 + 8.0 * (
            soft * (soft.log() - torch.log_softmax(logits / 4, 1))).sum(1).mean()
        loss.backward()
        grads.append((W.grad, b.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)
