"""Chaos in CI: concurrent runs on one folder, and a shard server that fails often; results stay exact."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from conftest import make_parquet_shards

TRIALS = 20
LOCK_MESSAGE = "is in use by pid"


def run_args(inp: Path, out: Path, keep: float, *extra: str) -> list[str]:
    sets = ["embed.encoder=precomputed", "cluster.k=4", "cluster.niter=5", f"select.keep_fraction={keep}", *extra]
    return [sys.executable, "-m", "datapruning.cli", "run", "--input", str(inp), "--output", str(out),
            *[x for s in sets for x in ("--set", s)]]


def snapshot(out: Path) -> dict[str, bytes]:
    files = sorted((out / "manifest").glob("*.parquet")) + [out / "kept.parquet"]
    return {f.name: f.read_bytes() for f in files}


def test_concurrent_runs_on_one_folder_never_mix(tmp_path):
    """Two runs (keep 0.5 and 0.2) start together on one folder, 20 times: the folder always holds exactly one
    run's manifest, kept list and stats; a loser fails at once naming the lock's holder."""
    inp = tmp_path / "emb"
    make_parquet_shards(inp, n_shards=3, per_shard=40)
    refs = {}
    for keep in (0.5, 0.2):
        assert subprocess.run(run_args(inp, tmp_path / f"ref{keep}", keep), capture_output=True).returncode == 0
        refs[keep] = snapshot(tmp_path / f"ref{keep}")
    rng, outcomes = random.Random(0), {"both_ran": 0, "one_locked_out": 0}
    out = tmp_path / "run"  # one folder: after the first trial, each starts on the last trial's finished run
    for trial in range(TRIALS):
        procs = {}
        for keep in rng.sample([0.5, 0.2], 2):
            procs[keep] = subprocess.Popen(run_args(inp, out, keep), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
            time.sleep(rng.random() * 0.6)
        results = {keep: (p.wait(timeout=300), p.stderr.read()) for keep, p in procs.items()}
        winners = [keep for keep, (rc, _) in results.items() if rc == 0]
        for keep, (rc, err) in results.items():
            assert rc == 0 or LOCK_MESSAGE in err, f"trial {trial}: keep {keep} failed otherwise: {err[-1500:]}"
        assert winners, f"trial {trial}: no run finished"
        got = snapshot(out)
        final = [keep for keep, ref in refs.items() if ref == got]
        assert final, f"trial {trial}: the manifest mixes runs"
        stats = json.loads((out / "stats.json").read_text())
        assert stats["config"]["select"]["keep_fraction"] == final[0]
        assert json.loads((out / "config.json").read_text())["select"]["keep_fraction"] == final[0]
        assert stats["kept"] == pq.read_metadata(out / "kept.parquet").num_rows
        if len(winners) == 1:
            assert final == winners
        outcomes["both_ran" if len(winners) == 2 else "one_locked_out"] += 1
        assert not (out / ".datapruning.lock").exists()
    assert outcomes["one_locked_out"] > 0, outcomes
