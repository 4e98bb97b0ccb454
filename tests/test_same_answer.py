"""Same data, same answer for the models the package trains: label values, row order, shard names, shard count
and the thread count never change a score or the kept set (issues 21 and 26)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datapruning.run import RunLayout

from datapruning import cli
from datapruning.metrics.dp4tl import train_linear_source_classifier
from datapruning.metrics.el2n import el2n_proxy
from datapruning.score import METRICS
from datapruning.score.base import ScoreInputs

REPO = Path(__file__).resolve().parents[1]
INTS, NAMES = np.array([3, 17, 999]), np.array(["ant", "bee", "cat"])  # both in the order of 0, 1, 2


def _data(n: int = 360, d: int = 16, classes: int = 3, seed: int = 0):
    """Three noisy classes (10% of the labels flipped), unit rows, and target embeddings near classes 0 and 2."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, d)) * 1.5
    y = rng.integers(classes, size=n)
    x = means[y] + rng.normal(size=(n, d))
    y = np.where(rng.random(n) < 0.1, (y + 1) % classes, y)
    target = means[rng.choice([0, 0, 2], size=60)] + rng.normal(size=(60, d))
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(x), y, unit(target)


# ---------------------------------------------------------------- label values: the public functions

def test_el2n_proxy_scores_do_not_depend_on_label_values():
    """Labels {0, 1, 2}, {3, 17, 999} and strings in the same order train the same 3-way heads (issue 21
    item 1: the 1000-way head gave Spearman 0.39-0.59 between the two codings)."""
    x, y, _ = _data()
    base = el2n_proxy(x, y, n_models=4, epochs=3)
    np.testing.assert_array_equal(el2n_proxy(x, INTS[y], n_models=4, epochs=3), base)
    np.testing.assert_array_equal(el2n_proxy(x, NAMES[y], n_models=4, epochs=3), base)
    with pytest.raises(ValueError, match=">= 0"):
        el2n_proxy(x, y - 1)


def test_linear_source_classifier_codes_its_classes():
    """The DP4TL classifier has one output per label present and predicts the labels themselves."""
    x, y, target = _data()
    base = train_linear_source_classifier(x, y, epochs=3)
    wide = train_linear_source_classifier(x, INTS[y], epochs=3)
    assert base.weight.shape == wide.weight.shape == (3, x.shape[1]) and wide.classes.tolist() == [3, 17, 999]
    np.testing.assert_array_equal(wide.weight, base.weight)
    np.testing.assert_array_equal(wide.predict(target), INTS[base.predict(target)])


def _inputs(x, labels):
    n = len(x)
    return ScoreInputs(uid=np.array([f"id-{i:05d}" for i in range(n)]), embeddings=x, cluster=np.zeros(n, np.int64),
                       cos_dist=np.zeros(n, np.float32), centroids=x[:1], labels=labels, seed=0)


def test_metrics_in_memory_code_label_values(tmp_path):
    """``METRICS[...](ScoreInputs)``: label values are coded 0..C-1 for the trained models, while a supplied
    classifier's column is still the label value."""
    x, y, target = _data()
    np.save(tmp_path / "target.npy", target)
    for name, params in (("el2n", {"n_models": 3, "epochs": 2}), ("dp4tl_lm", {"target": str(tmp_path / "target.npy"),
                                                                              "epochs": 3})):
        base = METRICS[name](_inputs(x, y), **params).scores
        np.testing.assert_array_equal(METRICS[name](_inputs(x, INTS[y]), **params).scores, base)
    logits = np.zeros((60, 1000), np.float32)
    logits[np.arange(60), np.r_[np.full(40, 17), np.full(20, 999)]] = 4.0  # 40 targets -> label 17, 20 -> 999
    np.save(tmp_path / "logits.npy", logits)
    got = METRICS["dp4tl_lm"](_inputs(x, INTS[y]), route="logits", logits=str(tmp_path / "logits.npy")).scores
    np.testing.assert_array_equal(got, np.array([0.0, 40.0, 20.0])[y])
    with pytest.raises(ValueError, match="no row has one"):  # every row unlabelled: nothing to code
        METRICS["el2n"](_inputs(x, np.full(len(x), -1)), n_models=1, epochs=1)


# ---------------------------------------------------------------- the CLI: labels, row order, shard names and count

def _write_shards(folder: Path, x, labels, order, n_shards: int, prefix: str) -> Path:
    folder.mkdir(parents=True)
    uids = np.array([f"id-{i:05d}" for i in range(len(x))])
    for s, rows in enumerate(np.array_split(order, n_shards)):
        pq.write_table(pa.table({"uid": uids[rows], "embedding": pa.array(list(x[rows]), pa.list_(pa.float32())),
                                 "label": pa.array(np.asarray(labels)[rows].tolist())}),
                       folder / f"{prefix}-{s:03d}.parquet")
    return folder


def _sets(target: Path) -> list[str]:
    keys = ["embed.encoder=precomputed", "cluster.k=3", "score.metrics=[el2n,dp4tl_lm,random]",
            "score.params.el2n.n_models=4", "score.params.el2n.epochs=3", f"score.params.dp4tl_lm.target={target}",
            "score.params.dp4tl_lm.epochs=3", "select.keep_fraction=0.3"]
    return [a for key in keys for a in ("--set", key)]


def _outcome(run: Path) -> dict:
    """uid -> (el2n, dp4tl_lm, keep) from the manifest, and the manifest's label values by uid."""
    table = pq.read_table(run / "manifest")
    cols = [table[c].to_pylist() for c in ("uid", "score_el2n", "score_dp4tl_lm", "keep", "label")]
    return {u: (e, d, k) for u, e, d, k, _ in zip(*cols)}, dict(zip(cols[0], cols[4]))


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """``datapruning run configs/el2n_ccs.yaml`` on the same rows: as given, relabelled {3, 17, 999}, relabelled
    to strings, and shuffled into 4 differently named shards (the base has 3)."""
    root = tmp_path_factory.mktemp("same")
    x, y, target = _data()
    np.save(root / "target.npy", target)
    order = np.arange(len(x))
    inputs = {"base": (y, order, 3, "part"), "ints": (INTS[y], order, 3, "part"), "names": (NAMES[y], order, 3, "part"),
              "moved": (y, np.random.default_rng(5).permutation(len(x)), 4, "renamed")}
    runs = {}
    cwd = os.getcwd()
    os.chdir(root)  # the CLI from a folder other than the run's
    try:
        for name, (labels, rows, n_shards, prefix) in inputs.items():
            shards = _write_shards(root / f"in-{name}", x, labels, rows, n_shards, prefix)
            assert cli.main(["run", str(REPO / "configs" / "el2n_ccs.yaml"), "--input", str(shards), "--output",
                             str(root / name), *_sets(root / "target.npy")]) == 0
            runs[name] = root / name
    finally:
        os.chdir(cwd)
    return runs, y


def test_cli_scores_and_kept_set_do_not_depend_on_labels_or_layout(cli_runs):
    runs, y = cli_runs
    base, base_labels = _outcome(runs["base"])
    assert len(base) == 360 and 0 < sum(k for _, _, k in base.values()) < 360
    assert len({d for _, d, _ in base.values()}) > 1  # the targets map to some classes more than others
    for name in ("ints", "names", "moved"):
        got, labels = _outcome(runs[name])
        assert got == base, name  # every score bit for bit, and the same kept uids
        stats = json.loads((runs[name] / "stats.json").read_text())
        assert stats["select"]["method"] == "ccs"
    uids = sorted(base)
    want = {"ints": INTS[y], "names": NAMES[y]}  # the manifest keeps the user's label values
    for name, values in want.items():
        labels = _outcome(runs[name])[1]
        assert [labels[u] for u in uids] == [v.item() for v in values]


def test_eval_sample_split_and_curves_do_not_depend_on_layout(cli_runs):
    """The eval's labelled sample, its held-out split and the probe fits are keyed by the uid hash."""
    from datapruning.evaluation.curves import run_eval
    from datapruning.evaluation.data import load_eval_data

    runs, _ = cli_runs
    a, b = (load_eval_data(runs[n], max_rows=300) for n in ("base", "moved"))
    np.testing.assert_array_equal(a.uid, b.uid)
    np.testing.assert_array_equal(a.test, b.test)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.scores["el2n"], b.scores["el2n"])
    tables = [run_eval(runs[n], fractions=(0.3, 1.0), seeds=1, kd="none", max_rows=300,
                       curves="el2n/hard,el2n/ccs,random")["table"] for n in ("base", "moved")]
    assert tables[0]["accuracy"].tolist() == tables[1]["accuracy"].tolist()


# ---------------------------------------------------------------- thread count and CPU kernels (issue 26)

THREADED = """
import hashlib, json, sys
import numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
import importlib
el2n_mod = importlib.import_module("datapruning.metrics.el2n")
el2n_mod.SMALL_STEP_MACS = 0  # every step on all threads: the multi-threaded path, even at this size
from datapruning.metrics.dp4tl import train_linear_source_classifier
rng = np.random.default_rng(0)
y = rng.integers(40, size=1500)
x = rng.normal(size=(40, 128))[y] * 0.3 + rng.normal(size=(1500, 128))
x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
s = el2n_mod.el2n_proxy(x, y, n_models=8, epochs=2)
clf = train_linear_source_classifier(x, y, epochs=2)
print(json.dumps({"threads": torch.get_num_threads(), "el2n": hashlib.sha256(s.tobytes()).hexdigest(),
                  "clf": hashlib.sha256(clf.weight.astype(np.float32).tobytes() + clf.predict(x).tobytes()).hexdigest(),
                  "clf64": hashlib.sha256(clf.weight.tobytes()).hexdigest()}))
"""


def _in_subprocess(threads: int, **env) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **env}
    out = subprocess.run([sys.executable, "-c", THREADED, str(threads)], capture_output=True, text=True, env=env,
                         check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_trained_models_do_not_depend_on_thread_count_or_cpu_kernels():
    """EL2N proxy scores and the DP4TL classifier (its float64 weights) are bit-identical on 1 and 4 threads (each
    in its own process, so the setting really applies). With torch and MKL held to their AVX2 kernels (another
    CPU's summation order) the float64 weights may differ in the last bits, but the scores at their stated float32
    precision, the classifier's predictions and its weights rounded to float32 are the same."""
    one, four = _in_subprocess(1), _in_subprocess(4)
    avx2 = _in_subprocess(1, ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    assert (one["threads"], four["threads"]) == (1, 4)
    assert one == {**four, "threads": 1}
    for key in ("el2n", "clf"):
        assert one[key] == avx2[key], key


# ---------------------------------------------------------------- DP4TL groups say which grouping they used

def test_dp4tl_groups_state_their_grouping(cli_runs, tmp_path, caplog):
    """`select.method: groups` on labelled data names its grouping in stats.json and the log, and warns when it
    is not the grouping the metric scores (issue 21 item 5: by: label was the silent default for dp4tl_fm)."""
    import logging
    import shutil

    runs, _ = cli_runs
    run = tmp_path / "run"
    shutil.copytree(runs["base"], run)
    for by, level in (("label", logging.INFO), ("cluster", logging.WARNING)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="datapruning"):
            assert cli.main(["select", "--output", str(run), "--set", "select.method=groups", "--set",
                             "select.metric=dp4tl_lm", "--set", f"select.params={{by: {by}}}"]) == 0
            assert cli.main(["manifest", "--output", str(run)]) == 0
        stats = json.loads((run / "stats.json").read_text())["select"]
        assert stats["by"] == by and stats["grouping"].startswith(f"by: {by}: keeps whole ")
        said = [r for r in caplog.records if "select groups: by: " + by in r.getMessage()]
        assert [r.levelno for r in said] == [level]
        assert ("published rule is by: label" in stats["grouping"]) == (by == "cluster")


# ---------------------------------------------------------------- a cached teacher's columns are the labels'

def _teacher_folder(run: Path, uids, table, n_classes: int, classes=()) -> None:
    (run / "teacher").mkdir(parents=True)
    pq.write_table(table, run / "teacher" / "00000.parquet")
    info = RunLayout(run).teacher_info
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps({"num_classes": n_classes, "classes": list(classes)}))


def test_cached_teacher_columns_follow_the_labels(tmp_path):
    """`eval --teacher cached` reads teacher column 999 for label 999 (code 2 of {3, 17, 999}), full or top-k,
    and matches string labels to the teacher's class names; unnamed columns for string labels are refused."""
    from datapruning.consumers.stored_logits import full_table, shifted, topk_table
    from datapruning.evaluation.kd import cached_teacher_logits
    from datapruning.labels import label_coding

    rng = np.random.default_rng(0)
    uids = [f"u{i}" for i in range(6)]
    logits = rng.normal(size=(6, 1000)).astype(np.float32) * 3
    logits[:, [3, 17, 999]] += 20.0  # the labels' columns hold the largest logits (top-k keeps them)
    want = shifted(logits).astype(np.float16).astype(np.float32)[:, [3, 17, 999]]
    ints = label_coding({"3", "17", "999"})
    for name, table in (("full", full_table(uids, logits)[0]), ("topk", topk_table(uids, logits, 5)[0])):
        _teacher_folder(tmp_path / name, uids, table, 1000)
        got = cached_teacher_logits(tmp_path / name, np.array(uids[::-1], dtype=object), ints)
        np.testing.assert_array_equal(got, want[::-1])
    columns = ["moth", "zebra", "cat", "ant"]
    _teacher_folder(tmp_path / "names", uids, full_table(uids, logits[:, :4])[0], 4, columns)
    names = label_coding({"zebra", "ant", "moth"})  # codes: ant 0, moth 1, zebra 2
    got = cached_teacher_logits(tmp_path / "names", np.array(uids, dtype=object), names)
    np.testing.assert_array_equal(got, shifted(logits[:, :4]).astype(np.float16).astype(np.float32)[:, [3, 0, 1]])
    _teacher_folder(tmp_path / "unnamed", uids, full_table(uids, logits[:, :4])[0], 4)
    with pytest.raises(ValueError, match="--classes"):
        cached_teacher_logits(tmp_path / "unnamed", np.array(uids, dtype=object), names)
