"""Kill a real `datapruning run` process with SIGKILL mid-run, rerun it, and get the same manifest bytes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import make_png_shards, tiny_clip_overrides


def start(cfg_args: list[str], inp: Path, out: Path) -> subprocess.Popen:
    sets = [x for a in cfg_args for x in ("--set", a)]
    return subprocess.Popen([sys.executable, "-m", "datapruning.cli", "run", "--input", str(inp), "--output",
                             str(out), *sets], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def manifest_bytes(out: Path) -> dict[str, bytes]:
    files = sorted((out / "manifest").glob("*.parquet")) + [out / "kept.parquet"]
    return {f.name: f.read_bytes() for f in files}


def test_sigkill_mid_embed_then_resume(tmp_path, tiny_clip_config):
    inp = tmp_path / "shards"
    make_png_shards(inp, n_shards=8, per_shard=48)
    args = tiny_clip_overrides(tiny_clip_config) + ["embed.batch_size=16"]

    reference = start(args, inp, tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]

    out = tmp_path / "run"
    proc = start(args, inp, out)
    deadline = time.time() + 300
    while not list((out / "_meta" / "embeddings").glob("_*.done.json")) and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = {p.name: p.read_bytes() for p in (out / "_meta" / "embeddings").glob("_*.done.json")}
    assert 1 <= len(done_before) < 8, "the kill should land between the first and the last shard"
    assert not (out / "manifest").exists()

    rerun = start(args, inp, out)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()[-2000:]
    for name, data in done_before.items():  # finished shards were not redone (their marker holds timing)
        assert (out / "_meta" / "embeddings" / name).read_bytes() == data
    assert manifest_bytes(out) == manifest_bytes(tmp_path / "ref")
    assert not list(out.rglob("*.tmp")), "no temporary files are left behind"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples_in"] == 8 * 48
