"""Two writers on one folder at once, through the real CLI (issue 22, item 2): every writer takes the folder's
lock, so a pair either runs one after the other or the loser stops at once naming the holder; the folder never
holds a mix of the two (teacher/teacher, eval/run, report/run, reshard/reshard into one output). A few
trials per pair by default, 20 with --long."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datapruning.run import RunLayout
from conftest import make_parquet_shards, make_png_shards, tiny_clip_overrides

LOCK_MESSAGE = "is in use by pid"
PRE = ["embed.encoder=precomputed", "cluster.k=4", "cluster.niter=5"]


def trials(long_mode: bool) -> int:
    return 20 if long_mode else 2


def command(*args) -> list[str]:
    return [sys.executable, "-m", "datapruning.cli", *map(str, args)]


def race(a: list[str], b: list[str], rng: random.Random) -> list[tuple[int, str]]:
    """Start ``a`` and ``b`` in a random order, a random 0-0.6 s apart; (exit code, stderr) of each, in order."""
    pair = [a, b] if rng.random() < 0.5 else [b, a]
    procs = []
    for args in pair:
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(rng.random() * 0.6)
    out = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for rc, err in out:
        assert rc == 0 or LOCK_MESSAGE in err, err[-2000:]
    return out if pair[0] is a else out[::-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("races")
    make_parquet_shards(root / "emb", n_shards=3, per_shard=60)
    proc = subprocess.run(command("run", "--input", root / "emb", "--output", root / "run",
                                  *[x for s in PRE for x in ("--set", s)]), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "run"


def test_two_teachers_never_mix(finished, tmp_path, long_mode):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    uids = pq.read_table(run / "manifest", columns=["uid"])["uid"].to_pylist()
    refs, args = {}, {}
    for name, seed in (("a", 1), ("b", 2)):
        logits = np.random.default_rng(seed).normal(size=(len(uids), 4)).astype(np.float32)
        pq.write_table(pa.table({"uid": uids, "logits": pa.array(list(logits), pa.list_(pa.float32()))}),
                       tmp_path / f"{name}.parquet")
        args[name] = command("teacher", run, "--source", "logits", "--logits", tmp_path / f"{name}.parquet", "--all")
        assert subprocess.run(args[name], capture_output=True).returncode == 0
        refs[name] = {p.name: p.read_bytes() for p in (run / "teacher").glob("*.parquet")}
    rng = random.Random(0)
    for _ in range(trials(long_mode)):
        race(args["a"], args["b"], rng)
        got = {p.name: p.read_bytes() for p in (run / "teacher").glob("*.parquet")}
        info = json.loads(RunLayout(run).teacher_info.read_text())
        winner = [name for name, ref in refs.items() if ref == got]
        assert winner, "teacher/ mixes two teachers' shards"
        assert info["config"]["logits"].endswith(f"{winner[0]}.parquet")


def test_eval_racing_a_run_never_leaves_curves_of_another_config(finished, tmp_path, long_mode):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    configs = [PRE, PRE + ["score.metrics=[ssp,random,semdedup]"]]
    rng = random.Random(1)
    for trial in range(trials(long_mode)):
        sets = configs[trial % 2]
        race(command("eval", run, "--kd", "none", "--fractions", "0.5,1", "--seeds", "1"),
             command("run", "--input", finished.parent / "emb", "--output", run,
                     *[x for s in sets for x in ("--set", s)]), rng)
        metrics = json.loads((run / "config.json").read_text())["score"]["metrics"]
        if (run / "eval" / "summary.json").exists():
            curves = {c["metric"] for c in json.loads((run / "eval" / "summary.json").read_text())["curves"]}
            assert ("semdedup" in curves) == ("semdedup" in metrics), (curves, metrics)


def test_report_racing_a_run_shows_the_run_s_config(finished, tmp_path, long_mode):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    rng = random.Random(2)
    for trial in range(trials(long_mode)):
        keep = (0.5, 0.3)[trial % 2]
        sets = [x for s in PRE + [f"select.keep_fraction={keep}"] for x in ("--set", s)]
        race(command("report", run), command("run", "--input", finished.parent / "emb", "--output", run, *sets), rng)
        if (run / "report.html").exists():
            now = json.loads((run / "config.json").read_text())["select"]["keep_fraction"]
            page = (run / "report.html").read_text()
            assert f"&quot;keep_fraction&quot;: {now}," in page, "the report shows another config than the run's"


def test_two_reshards_into_one_output_never_mix(tmp_path, tiny_clip_config, long_mode):
    make_png_shards(tmp_path / "shards", n_shards=3, per_shard=6)
    sets = [x for s in tiny_clip_overrides(tiny_clip_config) for x in ("--set", s)]
    assert subprocess.run(command("run", "--input", tmp_path / "shards", "--output", tmp_path / "run", *sets),
                          capture_output=True).returncode == 0
    refs = {}
    for n in (2, 3):
        assert subprocess.run(command("reshard", tmp_path / "run", "--output", tmp_path / f"ref{n}", "-n", n),
                              capture_output=True).returncode == 0
        refs[n] = {p.name: p.read_bytes() for p in (tmp_path / f"ref{n}").glob("*.tar")}
    rng = random.Random(3)
    for trial in range(trials(long_mode)):
        out = tmp_path / f"out{trial}"
        procs = {}
        for n in rng.sample([2, 3], 2):
            procs[n] = subprocess.Popen(command("reshard", tmp_path / "run", "--output", out, "-n", n),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(rng.random() * 0.3)
        results = {n: (p.wait(timeout=300), p.stderr.read()) for n, p in procs.items()}
        for rc, err in results.values():
            assert rc == 0 or LOCK_MESSAGE in err or "holds a reshard of another" in err, err[-2000:]
            assert "No such file or directory" not in err
        got = {p.name: p.read_bytes() for p in out.glob("*.tar")}
        assert got in refs.values(), "the output folder mixes two reshards"
        assert not list(out.rglob("*.tmp")) and not (out / ".datapruning.lock").exists()
