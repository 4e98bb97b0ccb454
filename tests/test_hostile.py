"""Issue 22's hostile cases through the real CLI: truncated tars, failing teachers, corrupt precomputed files,
killed evals, huge labels, stray temporary files, odd inputs, meaningless evals and the messages they give.
(Races: tests/test_races.py; transient faults: tests/test_transient.py; Ray: tests/test_ray_faults.py;
lost stage files and replaced inputs: tests/test_health.py.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datapruning.run import RunLayout
from conftest import make_parquet_shards, make_png_shards, tiny_clip_overrides
from test_kill import kill_parent_of_blocked_workers

PRE = ["embed.encoder=precomputed", "cluster.k=4", "cluster.niter=5"]


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datapruning.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def sets(items) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The single 'error:' line of a failed command (exit 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished precomputed run with labels (4 classes, 3 shards x 60) and its input folder beside it."""
    root = tmp_path_factory.mktemp("hostile")
    make_parquet_shards(root / "emb", n_shards=3, per_shard=60)
    proc = cli("run", "--input", root / "emb", "--output", root / "run", *sets(PRE))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "run"


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "run", ignore=shutil.ignore_patterns("teacher", "eval", "report.html"))
    return tmp_path / "run"


# ---------------------------------------------------------------- 22.1: truncated tars
def cut_points(path: Path) -> dict[str, int]:
    """Byte offsets that cut a tar: at the start of sample s0-0003's second member's header (its .png is whole,
    its .cls is not there), and inside that header."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    second = next(m for m in members if m.name == "s0-0003.cls")
    return {"at_header": second.offset, "inside_header": second.offset + 100}


def test_a_cut_tar_drops_and_counts_its_partial_sample_and_reshard_skips_it(tmp_path, tiny_clip_config):
    """A tar cut at the start of a header, or inside one, keeps the samples before the cut; the partial one
    is dropped and counted as truncated_shard (it kept a label-less sample before). reshard copies none of it."""
    folder = tmp_path / "shards"
    make_png_shards(folder, n_shards=1, per_shard=6)
    whole = (folder / "00000.tar").read_bytes()
    for name, cut in cut_points(folder / "00000.tar").items():
        (folder / f"{name}.tar").write_bytes(whole[:cut])
    (folder / "00000.tar").rename(tmp_path / "whole.tar")
    out = tmp_path / "run"
    proc = cli("run", "--input", folder, "--output", out, *sets(tiny_clip_overrides(tiny_clip_config)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"] == {"truncated_shard": 2}
    manifest = pq.read_table(out / "manifest")
    assert sorted(manifest["key"].to_pylist()) == sorted([f"s0-{i:04d}" for i in range(3)] * 2)
    assert manifest["label"].null_count == 0
    for shard in ("at_header", "inside_header"):
        assert f"skipping shard {shard}, key s0-0003: truncated_shard" in proc.stderr
    re = cli("reshard", out, "--output", tmp_path / "re", "-n", "100")
    assert re.returncode == 0, re.stderr[-2000:]
    with tarfile.open(tmp_path / "re" / "00000000.tar") as tar:
        names = tar.getnames()
    assert not any("s0-0003" in n for n in names) and len(names) == 3 * int(manifest["keep"].to_numpy().sum())


# ---------------------------------------------------------------- 22.3, 22.8, 22.13: teachers
def write_logits(path: Path, uids: list[str], logits) -> Path:
    pq.write_table(pa.table({"uid": uids, "logits": pa.array([list(map(float, r)) for r in logits],
                                                             pa.list_(pa.float32()))}), path)
    return path


NOT_A_CLASSIFIER = ("import torch\n"
                    "class Summer(torch.nn.Module):\n"
                    "    def __init__(self):\n"
                    "        super().__init__()\n"
                    "        self.w = torch.nn.Parameter(torch.ones(1))\n"
                    "    def forward(self, x):\n"
                    "        return (x * self.w).sum()\n")


def test_a_failing_teacher_keeps_the_cached_one(finished, tmp_path):
    """Four teachers that cannot work (missing logits file, ragged logits, zero-shot on embeddings of another
    model, a module that is not a classifier): each one line, and the good cached teacher stays, byte for byte."""
    run = copy_run(finished, tmp_path)
    uids = pq.read_table(run / "manifest", columns=["uid"])["uid"].to_pylist()
    good = write_logits(tmp_path / "good.parquet", uids, np.random.default_rng(0).normal(size=(len(uids), 4)))
    assert cli("teacher", run, "--source", "logits", "--logits", good, "--all").returncode == 0
    cached = {p.name: p.read_bytes() for p in (run / "teacher").iterdir()}
    ragged = write_logits(tmp_path / "ragged.parquet", uids, [[0.0] * (3 + i % 2) for i in range(len(uids))])
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "summer.py").write_text(NOT_A_CLASSIFIER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'mods'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cases = {"No such file or directory": ("--source", "logits", "--logits", tmp_path / "missing.parquet"),
             "mixed dimensions": ("--source", "logits", "--logits", ragged),
             "come from another model": ("--source", "zero_shot", "--classes", "a,b,c,d", "--on", "embeddings",
                                         "--model-config", tmp_path / "nothing.json"),
             "is it a classifier": ("--source", "module", "--module", "summer:Summer", "--allow-random-weights",
                                    "--on", "embeddings")}
    for message, args in cases.items():
        line = one_error(cli("teacher", run, *args, "--all", env=env))
        assert message in line, line
        assert {p.name: p.read_bytes() for p in (run / "teacher").iterdir()} == cached, message


def test_teacher_logits_far_below_the_top_are_clamped_finite_and_train_kd_is_finite(finished, tmp_path):
    """Margins above 65,504 were float16 -inf and made KD's loss NaN: now clamped to -65,504, counted."""
    run = copy_run(finished, tmp_path)
    man = pq.read_table(run / "manifest", columns=["uid", "label"])
    uids, labels = man["uid"].to_pylist(), man["label"].to_numpy()
    logits = np.full((len(uids), 4), -9e4, np.float32)
    logits[np.arange(len(uids)), labels] = 10.0
    proc = cli("teacher", run, "--source", "logits", "--logits", write_logits(tmp_path / "l.parquet", uids, logits),
               "--all")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stored = np.stack(pq.read_table(run / "teacher")["logits"].to_numpy(zero_copy_only=False)).astype(np.float32)
    assert np.isfinite(stored).all() and stored.min() == -65504.0
    assert json.loads(RunLayout(run).teacher_info.read_text())["clamped_logits"] == 3 * len(uids)
    assert "clamped to -65,504" in proc.stderr
    train = subprocess.run([sys.executable, "pipelines/train.py", str(run), "--kd", "--epochs", "2", "--metrics",
                            str(tmp_path / "h.json")], capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).resolve().parents[1])
    assert train.returncode == 0, train.stderr[-2000:]
    assert all(np.isfinite(h["train_loss"]) for h in json.loads((tmp_path / "h.json").read_text())["history"])


def test_teacher_messages(finished, tmp_path):
    """Zero-shot on images of a precomputed run names the reason (it blamed a changed shard); ragged logits end
    with exit 2 each time (exit 134 happened in 2 runs of 10)."""
    run = copy_run(finished, tmp_path)
    line = one_error(cli("teacher", run, "--source", "zero_shot", "--classes", "a,b", "--on", "images"))
    assert "reads images, but this run's input is parquet (embeddings, no images)" in line
    line = one_error(cli("teacher", run, "--source", "zero_shot", "--classes", "a,b"))  # auto: another model
    assert "reads images, but this run's input is parquet (embeddings, no images)" in line
    uids = pq.read_table(run / "manifest", columns=["uid"])["uid"].to_pylist()
    ragged = write_logits(tmp_path / "ragged.parquet", uids, [[0.0] * (3 + i % 2) for i in range(len(uids))])
    for _ in range(3):
        assert "mixed dimensions" in one_error(cli("teacher", run, "--source", "logits", "--logits", ragged))


# ---------------------------------------------------------------- 22.5: corrupt precomputed shards
def test_one_corrupt_parquet_among_eight_is_skipped_and_counted(tmp_path):
    make_parquet_shards(tmp_path / "emb", n_shards=8, per_shard=20)
    bad = tmp_path / "emb" / "part-005.parquet"
    bad.write_bytes(b"PAR1" + bytes(200) + b"PAR1")
    proc = cli("run", "--input", tmp_path / "emb", "--output", tmp_path / "run", *sets(PRE))
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["skipped"] == {"unreadable_shard": 1} and stats["samples_in"] == 140
    assert "skipping shard part-005: unreadable_shard" in proc.stderr and str(bad) in proc.stderr
    line = one_error(cli("run", "--input", tmp_path / "emb", "--output", tmp_path / "strict",
                         *sets(PRE + ["strict=true"])))
    assert "shard part-005: unreadable_shard" in line and "not a readable parquet file" in line


# ---------------------------------------------------------------- 22.7: a killed eval
EVAL_HOOK = (
    "import os, time\n"
    "if os.environ.get('BLOCK_DIR'):\n"
    "    import datapruning.evaluation.fits as _fits\n"
    "    _real = _fits._init_worker\n"
    "    def parked_worker(*a):\n"
    "        _real(*a)\n"
    "        open(os.path.join(os.environ['BLOCK_DIR'], str(os.getpid())), 'w').close()\n"
    "        time.sleep(600)\n"
    "    _fits._init_worker = parked_worker\n")


def test_a_killed_eval_leaves_no_worker_and_its_folder_goes_next_time(finished, tmp_path):
    """SIGKILL of eval while its two probe workers run: none survives it, and the next eval removes the folder
    that held their arrays (it left ~750 MB workers, the resource tracker and a datapruning-eval-* folder)."""
    run = copy_run(finished, tmp_path)
    args = [sys.executable, "-m", "datapruning.cli", "eval", str(run), "--workers", "2", "--kd", "none",
            "--fractions", "0.5,1", "--seeds", "1"]
    assert kill_parent_of_blocked_workers(tmp_path, args, 2, EVAL_HOOK) == []
    assert list(run.glob(".eval-fits.p*.tmp")), "the workers' arrays were not in the run folder"
    again = cli(*args[3:])
    assert again.returncode == 0, again.stderr[-2000:]
    assert not list(run.glob(".eval-fits.*")) and (run / "eval" / "summary.json").exists()


# ---------------------------------------------------------------- 22.9, 22.10: a huge label, stray temporaries
def test_a_report_with_a_one_megabyte_label_renders(tmp_path):
    make_parquet_shards(tmp_path / "emb", n_shards=1, per_shard=40)
    path = tmp_path / "emb" / "part-000.parquet"
    table = pq.read_table(path)
    labels = ["x" * (1 << 20) if i % 2 else "short" for i in range(table.num_rows)]
    pq.write_table(table.set_column(table.column_names.index("label"), "label", pa.array(labels)), path)
    assert cli("run", "--input", tmp_path / "emb", "--output", tmp_path / "run", *sets(PRE)).returncode == 0
    proc = cli("report", tmp_path / "run", timeout=180)  # a hang guard, not a speed target
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "report.html").stat().st_size > 0


def test_temporary_files_in_stage_sub_folders_go_with_the_next_run(finished, tmp_path):
    """What a killed run leaves in clusters/parts, clusters/ties and the score stage's cluster-group folders is
    removed by the next completed run (4 of 85 kills left one, a full partition among them)."""
    run = copy_run(finished, tmp_path)
    planted = [run / "clusters" / "parts" / ".part-000.emb.p999999999@gone.x1.tmp",
               run / "clusters" / "ties" / ".part-000.u64.p999999999@gone.x2.tmp",
               run / "_meta" / "scores" / "parts" / "ssp" / ".g00000.parquet.p999999999@gone.x3.tmp",
               run / "scores" / ".part-001.parquet.p999999999@gone.x4.tmp"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 4096)
    proc = cli("run", "--input", finished.parent / "emb", "--output", run, *sets(PRE))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(run.rglob("*.tmp"))


# ---------------------------------------------------------------- 22.11: inputs
def test_inputs_a_literal_braced_folder_left_out_files_and_output_inside_input(tmp_path, caplog):
    for name in ("e{a,b}", "ea", "eb"):
        make_parquet_shards(tmp_path / name, n_shards=1, per_shard=20, seed=len(name))
    proc = cli("run", "--input", tmp_path / "e{a,b}", "--output", tmp_path / "lit", *sets(PRE + ["cluster.k=2"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "lit" / "stats.json").read_text())["samples_in"] == 20  # not ea + eb
    folder = tmp_path / "mixed"
    make_parquet_shards(folder, n_shards=2, per_shard=20)
    (folder / "part-001.parquet").rename(folder / ".part-001.parquet")
    (folder / "sub").mkdir()
    shutil.copy(folder / "part-000.parquet", folder / "sub" / "part-009.parquet")
    (folder / "gone.parquet").symlink_to(tmp_path / "nowhere.parquet")
    proc = cli("run", "--input", folder, "--output", tmp_path / "mixed-run", *sets(PRE + ["cluster.k=2"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = next(line for line in proc.stderr.splitlines() if "left out" in line)
    for named in (".part-001.parquet (a hidden file)", "gone.parquet (a broken symbolic link)",
                  "sub (a sub-folder with 1 shard file(s)"):
        assert named in warning, warning
    for out, says in ((folder, "is the input folder"), (folder / "run", "is inside the input folder")):
        line = one_error(cli("run", "--input", folder, "--output", out, *sets(PRE)))
        assert says in line and "choose an output outside the input" in line
    line = one_error(cli("run", "--input", folder / "*.parquet", "--output", folder, *sets(PRE)))
    assert "holds the input shard" in line
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["gone.parquet",
                                                                                      "part-000.parquet", "sub"]


# ---------------------------------------------------------------- 22.12: meaningless evals, eval flags
def test_eval_refuses_meaningless_accuracy(tmp_path):
    make_parquet_shards(tmp_path / "one", n_shards=1, per_shard=40)
    path = tmp_path / "one" / "part-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index("label"), "label", pa.array([1] * 40)), path)
    assert cli("run", "--input", tmp_path / "one", "--output", tmp_path / "r1", *sets(PRE)).returncode == 0
    assert "holds a single class" in one_error(cli("eval", tmp_path / "r1", "--kd", "none"))
    make_parquet_shards(tmp_path / "split", n_shards=1, per_shard=60)
    path = tmp_path / "split" / "part-000.parquet"
    table = pq.read_table(path)
    labels = table["label"].to_numpy()
    split = np.where(labels == 3, "test", "train")  # the held-out rows' only class never trains
    pq.write_table(table.set_column(table.column_names.index("split"), "split", pa.array(split)), path)
    assert cli("run", "--input", tmp_path / "split", "--output", tmp_path / "r2", *sets(PRE)).returncode == 0
    assert "none of the 1 classes of the held-out rows" in one_error(cli("eval", tmp_path / "r2", "--kd", "none"))


@pytest.mark.parametrize("flag, value, says", [
    ("--tolerance", "nan", "--tolerance must be in [0, 1)"), ("--kd-T", "0", "--kd-T must be a finite temperature"),
    ("--kd-T", "-1", "--kd-T must be a finite temperature"), ("--l2", "nan", "--l2 must be finite numbers >= 0"),
    ("--l2", "abc", "--l2: expected a number"), ("--kd-alpha", "5", "--kd-alpha must be in [0, 1]"),
    ("--max-iter", "0", "--max-iter must be >= 1"), ("--test-fraction", "1.5", "--test-fraction must be in (0, 1)"),
])
def test_eval_checks_every_numeric_flag_before_it_starts(finished, tmp_path, flag, value, says):
    run = copy_run(finished, tmp_path)
    line = one_error(cli("eval", run, flag, value))
    assert says in line, line
    assert not (run / "eval").exists() and not list(run.glob(".eval-fits*"))


# ---------------------------------------------------------------- 22.13: messages
def test_messages_name_the_key_or_file_and_stay_short(finished, tmp_path):
    inp = finished.parent / "emb"
    huge = "x" * 60_000
    for args, says in ((("--set", f"select.metric={huge}"), "is not in score.metrics"),
                       (("--set", "select.metric=typo"), "is not in score.metrics"),
                       (("--set", "score.metrics=[]"), "give at least one metric")):
        line = one_error(cli("run", "--input", inp, "--output", tmp_path / "a", *sets(PRE), *args))
        assert len(line) < 400 and says in line, line[:500]
        assert not (tmp_path / "a" / "embeddings").exists()  # refused before any stage ran
    line = one_error(cli("run", "--input", tmp_path / huge[:200] / huge[:200], "--output", tmp_path / "b", *sets(PRE)))
    assert len(line) < 400 and "no such file or folder" in line
    proc = cli("run", "--input", inp, "--output", tmp_path / "c", *sets(PRE + ["select.keep_fraction=1e-3"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "c" / "config.json").read_text())["select"]["keep_fraction"] == 0.001
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in one_error(cli("run", "--input", inp, "--output", tmp_path / "file", *sets(PRE)))
    os.mkfifo(tmp_path / "fifo.yaml")
    for config in (tmp_path / "fifo.yaml", "/dev/zero"):
        line = one_error(cli("run", config, "--input", inp, "--output", tmp_path / "d", timeout=60))
        assert "not a regular file" in line
    odd = tmp_path / "odd"
    make_parquet_shards(odd, n_shards=1, per_shard=20)
    (odd / "part-000.parquet").rename(odd / os.fsdecode(b"\xff\xfe.parquet"))
    line = one_error(cli("run", "--input", odd, "--output", tmp_path / "e", *sets(PRE)))
    assert "the name is not valid UTF-8" in line and "\\udcff" in line
    listed = tmp_path / "listed"
    make_parquet_shards(listed, n_shards=1, per_shard=20)
    table = pq.read_table(listed / "part-000.parquet")
    pq.write_table(table.set_column(table.column_names.index("label"), "label", pa.array([[1, 2]] * 20)),
                   listed / "part-000.parquet")
    line = one_error(cli("run", "--input", listed, "--output", tmp_path / "f", *sets(PRE)))
    assert "column 'label' holds list<" in line and "part-000.parquet" in line
    train = subprocess.run([sys.executable, "pipelines/train.py", str(finished), "--holdout", "1.0"],
                           capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert train.returncode != 0 and "no kept sample is left to train on" in train.stderr
    assert "Traceback" not in train.stderr


ENOSPC_HOOK = ("import errno, os, pathlib\n"
               "if os.environ.get('FULL_DISK'):\n"
               "    _real = pathlib.Path.write_bytes\n"
               "    def write_bytes(self, data):\n"
               "        if self.name.startswith('.datapruning.lock'):\n"
               "            raise OSError(errno.ENOSPC, 'No space left on device')\n"
               "        return _real(self, data)\n"
               "    pathlib.Path.write_bytes = write_bytes\n")


def test_a_full_disk_while_taking_the_lock_names_the_lock_file(finished, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(ENOSPC_HOOK)
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "FULL_DISK": "1"}
    line = one_error(cli("run", "--input", finished.parent / "emb", "--output", tmp_path / "run", *sets(PRE), env=env))
    assert f"cannot write the lock file {tmp_path / 'run' / '.datapruning.lock'}: No space left on device" in line
