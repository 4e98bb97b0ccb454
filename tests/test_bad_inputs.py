"""Bad inputs end in a counted skip (default) or a one-line error (strict), never a deep traceback."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import add_member, make_png_shards, png_bytes, tiny_clip_overrides

RNG = np.random.default_rng(0)


def good_sample(tar, key: str, label: int = 0) -> None:
    add_member(tar, f"{key}.png", png_bytes(RNG, np.full((32, 32, 3), 100.0)))
    add_member(tar, f"{key}.cls", str(label).encode())


def write_tar(path, build) -> None:
    with tarfile.open(path, "w") as tar:
        build(tar)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "datapruning.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def bad_shards(folder):
    """One good shard plus one shard per kind of damage; returns {shard name: samples that are good}."""
    make_png_shards(folder, n_shards=1, per_shard=6)
    good = {"00000": 6}

    def corrupt_image(tar):
        good_sample(tar, "a")
        add_member(tar, "b.png", b"\x89PNG\r\n\x1a\n not really a png")
        good_sample(tar, "c")
    write_tar(folder / "corrupt_image.tar", corrupt_image)
    good["corrupt_image"] = 2

    def missing_image(tar):
        good_sample(tar, "a")
        add_member(tar, "b.cls", b"1")  # no image at all
        add_member(tar, "c.txt", b"caption only")
    write_tar(folder / "missing_image.tar", missing_image)
    good["missing_image"] = 1

    def duplicate_keys(tar):
        good_sample(tar, "a")
        good_sample(tar, "b")
        good_sample(tar, "a")  # the same key again, not adjacent
    write_tar(folder / "duplicate_keys.tar", duplicate_keys)
    good["duplicate_keys"] = 2

    write_tar(folder / "empty.tar", lambda tar: None)
    good["empty"] = 0
    (folder / "zero_bytes.tar").write_bytes(b"")
    good["zero_bytes"] = 0
    (folder / "not_a_tar.tar").write_bytes(b"this is a text file, not a tar archive\n" * 50)
    good["not_a_tar"] = 0

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(4):
            good_sample(tar, f"k{i}")
    (folder / "truncated.tar").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    good["truncated"] = None  # some prefix of the samples survives
    return good


def test_bad_shards_are_skipped_and_counted(tmp_path, tiny_clip_config):
    folder = tmp_path / "shards"
    good = bad_shards(folder)
    out = tmp_path / "run"
    proc = run_cli("run", "--input", folder, "--output", out,
                   *[x for a in tiny_clip_overrides(tiny_clip_config) + ["cluster.k=2"] for x in ("--set", a)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = pq.read_table(out / "manifest").to_pandas()
    counts = manifest.groupby("shard").size().to_dict()
    for shard, n in good.items():
        if n is not None:
            assert counts.get(shard, 0) == n, shard
    assert 0 < counts.get("truncated", 0) < 4
    assert manifest["uid"].is_unique
    stats = json.loads((out / "stats.json").read_text())
    skipped = stats["skipped"]
    assert skipped["corrupt_image"] == 1 and skipped["missing_image"] == 2 and skipped["duplicate_key"] == 1
    assert skipped["unreadable_shard"] >= 2 and skipped["truncated_shard"] == 1
    assert stats["samples_in"] == len(manifest)


def test_strict_mode_stops_at_first_bad_sample(tmp_path, tiny_clip_config):
    folder = tmp_path / "shards"
    write_tar(folder.mkdir() or folder / "x.tar",
              lambda tar: (good_sample(tar, "a"), add_member(tar, "b.png", b"garbage")))
    proc = run_cli("run", "--input", folder, "--output", tmp_path / "run",
                   *[x for a in tiny_clip_overrides(tiny_clip_config) + ["strict=true", "cluster.k=1"]
                     for x in ("--set", a)])
    assert proc.returncode == 2
    assert "shard x, key b: corrupt_image" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_non_utf8_text_is_skipped(tmp_path, tiny_clip_config):
    folder = tmp_path / "shards"
    folder.mkdir()

    def build(tar):
        for i, text in enumerate([b"fine caption", b"\xff\xfe bad bytes", b"another one"]):
            add_member(tar, f"k{i}.txt", text)
    write_tar(folder / "t.tar", build)
    out = tmp_path / "run"
    proc = run_cli("run", "--input", folder, "--output", out,
                   *[x for a in tiny_clip_overrides(tiny_clip_config) + ["embed.modality=text", "cluster.k=1"]
                     for x in ("--set", a)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "stats.json").read_text())["skipped"] == {"bad_text_encoding": 1}


def parquet_with(tmp_path, embeddings, labels=None, name="p.parquet"):
    folder = tmp_path / "emb"
    folder.mkdir(exist_ok=True)
    cols = {"uid": [f"u{i}" for i in range(len(embeddings))], "embedding": pa.array(embeddings, pa.list_(pa.float32()))}
    if labels is not None:
        cols["label"] = pa.array(labels, pa.int64())
    pq.write_table(pa.table(cols), folder / name)
    return folder


def precomputed(*extra):
    return [x for a in ["embed.encoder=precomputed", *extra] for x in ("--set", a)]


def test_no_daemon_thread_outlives_a_failed_cli_run(tmp_path):
    """A daemon thread (tqdm's monitor, the lock heartbeat) waking during interpreter exit aborted the CLI
    with 'terminate called without an active exception' (exit -6 instead of 2), about 1 run in 5 under load."""
    inp = parquet_with(tmp_path, [[1.0, 0.0], [0.0, 1.0, 0.0]])
    script = ("import sys, threading\nfrom datapruning.cli import main\n"
              f"code = main(['run', '--input', {str(inp)!r}, '--output', {str(tmp_path / 'run')!r}, "
              "'--set', 'embed.encoder=precomputed', '--set', 'cluster.k=1'])\n"
              "print(code, sorted(t.name for t in threading.enumerate() if t.daemon and t.is_alive()))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split("\n")[-2] == "2 []", proc.stdout + proc.stderr


def test_nan_and_inf_embeddings_are_skipped(tmp_path):
    x = RNG.normal(size=(10, 4)).tolist()
    x[3][1], x[7][0] = float("nan"), float("inf")
    out = tmp_path / "run"
    proc = run_cli("run", "--input", parquet_with(tmp_path, x), "--output", out, *precomputed("cluster.k=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {"non_finite_embedding": 2} and stats["samples_in"] == 8


def test_mixed_dimensions_name_the_file(tmp_path):
    x = [[1.0, 0.0], [0.0, 1.0, 0.0]]
    proc = run_cli("run", "--input", parquet_with(tmp_path, x), "--output", tmp_path / "run", *precomputed("cluster.k=1"))
    assert proc.returncode == 2 and "p.parquet: embeddings of mixed dimensions" in proc.stderr


def test_mixed_dimensions_across_files(tmp_path):
    parquet_with(tmp_path, RNG.normal(size=(5, 4)).tolist(), name="a.parquet")
    folder = parquet_with(tmp_path, RNG.normal(size=(5, 6)).tolist(), name="b.parquet")
    proc = run_cli("run", "--input", folder, "--output", tmp_path / "run", *precomputed("cluster.k=1"))
    assert proc.returncode == 2 and "mixed embedding dimensions [4, 6]" in proc.stderr


def test_label_column_with_nulls(tmp_path):
    x, _ = RNG.normal(size=(12, 4)), None
    folder = parquet_with(tmp_path, x.tolist(), labels=[0, 1, None, 1, 0, None, 1, 0, 1, 0, 1, 0])
    out = tmp_path / "run"
    proc = run_cli("run", "--input", folder, "--output", out,
                   *precomputed("cluster.k=2", "select.min_per_label=0.5", "select.keep_fraction=0.5"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = pq.read_table(out / "manifest").to_pandas()
    assert manifest["label"].isna().sum() == 2 and manifest["keep"].sum() == 6


def test_identical_embeddings(tmp_path):
    x = np.tile([[0.6, 0.8, 0.0]], (20, 1)).tolist()
    out = tmp_path / "run"
    proc = run_cli("run", "--input", parquet_with(tmp_path, x), "--output", out, *precomputed("cluster.k=3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = pq.read_table(out / "manifest").to_pandas()
    assert manifest["keep"].sum() == 10 and np.isfinite(manifest["score_ssp"]).all()


def test_duplicate_uids_across_files_are_an_error(tmp_path):
    parquet_with(tmp_path, RNG.normal(size=(5, 4)).tolist(), name="a.parquet")
    folder = parquet_with(tmp_path, RNG.normal(size=(5, 4)).tolist(), name="b.parquet")
    proc = run_cli("run", "--input", folder, "--output", tmp_path / "run", *precomputed("cluster.k=1"))
    assert proc.returncode == 2 and "duplicate uid across shards: u0" in proc.stderr


@pytest.mark.parametrize("text, message", [
    ("select: [1, 2]\n", "config key 'select': expected a mapping"),
    ("cluster:\n  k: ten\n", "config key 'cluster.k': expected an integer"),
    ("nonsense: 1\n", "unknown config key 'nonsense'"),
    ("a: [unclosed\n", "not valid YAML"),
    ("!!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
])
def test_bad_config_files(tmp_path, parquet_shards, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    proc = run_cli("run", cfg, "--input", parquet_shards[0].parent, "--output", tmp_path / "run")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "hacked" not in proc.stdout


# ---- issue 13: inputs named exactly, one-line errors ---------------------------------------------------

def test_a_folder_named_with_brackets_is_not_a_glob(tmp_path):
    from datapruning.io.shards import expand_input

    for name, shard in (("d1", "a.tar"), ("d[1]", "b.tar")):
        (tmp_path / name).mkdir()
        (tmp_path / name / shard).write_bytes(b"")
    assert expand_input(str(tmp_path / "d[1]")) == [str(tmp_path / "d[1]" / "b.tar")]
    assert expand_input(str(tmp_path / "d[1]" / "*.tar")) == [str(tmp_path / "d[1]" / "b.tar")]


def test_url_glob_is_a_one_line_error(tmp_path):
    r = run_cli("embed", "--input", "http://127.0.0.1:9/*.tar", "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot list it" in r.stderr and "AttributeError" not in r.stderr


def test_missing_filesystem_package_is_named(tmp_path):
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed")
    r = run_cli("embed", "--input", "s3://bucket/x.tar", "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "needs another package" in r.stderr and "s3fs" in r.stderr


@pytest.mark.parametrize("fractions", ["nan", "0.5,nan", "2", "0", "abc", ","])
def test_eval_fractions_are_checked(tmp_path, fractions):
    r = run_cli("eval", str(tmp_path), "--fractions", fractions)
    assert r.returncode == 2 and "--fractions" in r.stderr and "Traceback" not in r.stderr


# ---- issue 13, round two: labels and precomputed values -------------------------------------------------

def labelled_parquet(tmp_path, embeddings, labels, label_type):
    folder = tmp_path / "emb"
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.table({"uid": [f"u{i}" for i in range(len(embeddings))],
                             "embedding": pa.array(embeddings, pa.list_(pa.float32())),
                             "label": pa.array(labels, label_type)}), folder / "p.parquet")
    return folder


def test_finite_values_near_float32_max_are_normalised_not_zeroed(tmp_path):
    x = RNG.normal(size=(12, 4))
    x[:6] *= 1e38
    x[6] = 0.0
    out = tmp_path / "run"
    proc = run_cli("run", "--input", labelled_parquet(tmp_path, np.clip(x, -3e38, 3e38).tolist(), [0, 1] * 6,
                                                       pa.int64()), "--output", out, *precomputed("cluster.k=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    emb = np.stack(pq.read_table(out / "embeddings").to_pandas()["embedding"])
    assert len(emb) == 11 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert json.loads((out / "stats.json").read_text())["skipped"] == {"zero_embedding": 1}


def test_a_nan_float_label_is_a_missing_label(tmp_path):
    labels = [float("nan") if i % 4 == 0 else float(i % 2) for i in range(12)]
    out = tmp_path / "run"
    proc = run_cli("run", "--input", labelled_parquet(tmp_path, RNG.normal(size=(12, 4)).tolist(), labels,
                                                       pa.float64()), "--output", out, *precomputed("cluster.k=2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = pq.read_table(out / "manifest").to_pandas()
    assert manifest["label"].isna().sum() == 3 and set(manifest["label"].dropna()) == {0, 1}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["nan_labels"] == 3 and "nan" not in stats["labels"]


@pytest.mark.parametrize("others", [["2"], ["cat"]])
def test_integer_labels_are_one_class_whatever_their_spelling(tmp_path, others):
    """'1', '01' and '+1' are class 1 in the manifest, the stats and the selection, with or without
    non-integer labels beside them (they were merged with '2' beside them and split with 'cat')."""
    labels = (["1", "01", "+1"] + others) * 5
    out = tmp_path / "run"
    proc = run_cli("run", "--input", labelled_parquet(tmp_path, RNG.normal(size=(len(labels), 4)).tolist(), labels,
                                                       pa.string()), "--output", out,
                   *precomputed("cluster.k=2", "select.method=balanced", "select.keep_fraction=0.4"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = pq.read_table(out / "manifest").to_pandas()
    assert sorted(set(manifest["label"].astype(str))) == sorted({"1", *others})
    stats = json.loads((out / "stats.json").read_text())
    assert stats["labels"]["1"]["total"] == 15
    assert manifest.groupby(manifest["label"].astype(str))["keep"].sum().to_dict() == {"1": 4, others[0]: 4}


def test_a_unicode_digit_label_is_a_string_label(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("run", "--input", labelled_parquet(tmp_path, RNG.normal(size=(12, 4)).tolist(), ["1", "\u00b2"] * 6,
                                                       pa.string()), "--output", out, *precomputed("cluster.k=2"))
    assert proc.returncode == 0 and "invalid literal" not in proc.stderr, proc.stderr[-2000:]
    assert set(pq.read_table(out / "manifest").to_pandas()["label"]) == {"1", "\u00b2"}


def test_no_valid_sample_is_named_not_blamed_on_cluster_k(tmp_path):
    folder = parquet_with(tmp_path, np.zeros((6, 4)).tolist())
    out = tmp_path / "run"
    proc = run_cli("run", "--input", folder, "--output", out, *precomputed("cluster.k=2"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no valid samples found in the 1 input shard(s) (zero_embedding: 6)" in proc.stderr
    assert "cluster.k" not in proc.stderr
    proc = run_cli("cluster", "--output", out)  # the stage alone says the same
    assert proc.returncode == 2 and "no valid samples found" in proc.stderr and "cluster.k" not in proc.stderr


def test_a_non_utf8_member_name_skips_that_sample(tmp_path):
    from collections import Counter

    from datapruning.errors import BadSample
    from datapruning.io.webdataset import iter_tar_samples

    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for key in ("a", "b\udcff", "c"):
            good_sample(tar, key)
    skipped = Counter()
    assert [s["__key__"] for s in iter_tar_samples(str(path), "x", skipped)] == ["a", "c"]
    assert skipped == {"bad_member_name": 1}
    with pytest.raises(BadSample, match=r"shard x, key b\\xff: bad_member_name \(tar member name 'b\\xff.png'"):
        list(iter_tar_samples(str(path), "x", Counter(), strict=True))
    with pytest.raises(BadSample, match="bad_member_name"):  # the fast parser too
        list(iter_tar_samples(str(path), "x", Counter(), strict=True, fast=True))


def test_inputs_are_never_left_out_silently(tmp_path, caplog):
    from datapruning.io.shards import detect_format, expand_input

    folder = parquet_with(tmp_path, RNG.normal(size=(6, 4)).tolist())
    r = run_cli("run", "--input", folder, tmp_path / "nothing*.parquet", "--output", tmp_path / "run",
                *precomputed("cluster.k=1"))  # (a) a second pattern that matches nothing
    assert r.returncode == 2 and "nothing*.parquet': matched no shards" in r.stderr
    shards = tmp_path / "shards"  # (b) a .tar.gz beside .tar files is read; other files are named in a warning
    write_tar(shards.mkdir() or shards / "a.tar", lambda tar: good_sample(tar, "k"))
    (shards / "b.tar.gz").write_bytes(__import__("gzip").compress((shards / "a.tar").read_bytes()))
    (shards / "notes.txt").write_text("not a shard")
    found = expand_input(str(shards))
    assert [p.rsplit("/", 1)[1] for p in found] == ["a.tar", "b.tar.gz"] and detect_format(found) == "webdataset"
    assert "left out 1 file(s) that are not shards: notes.txt" in caplog.text
    (tmp_path / "c").mkdir()
    for name in ("00001-a", "a", "a.v2"):  # (c) shard names that would collide
        parquet_with(tmp_path / "c", RNG.normal(size=(3, 4)).tolist(), name=f"{name}.parquet")
    r = run_cli("run", "--input", tmp_path / "c" / "emb", "--output", tmp_path / "run2", *precomputed("cluster.k=1"))
    assert r.returncode == 2 and "00001-a.parquet and " in r.stderr and "a.parquet would both be named" in r.stderr


def test_eval_label_column_and_held_out_rows_are_checked(tmp_path):
    folder = labelled_parquet(tmp_path, RNG.normal(size=(12, 4)).tolist(), list(range(12)), pa.int64())
    out = tmp_path / "run"
    assert run_cli("run", "--input", folder, "--output", out, *precomputed("cluster.k=2")).returncode == 0
    r = run_cli("eval", out, "--label-column", "uid", "--kd", "none")
    assert r.returncode == 2 and "--label-column 'uid' names a row id" in r.stderr and "exists 2 times" not in r.stderr
    r = run_cli("eval", out, "--kd", "none")  # every class has one row: nothing can be held out
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "too few labelled rows per class to hold out a test split (12 rows in 12 classes" in r.stderr
    assert not (out / "eval").exists()
