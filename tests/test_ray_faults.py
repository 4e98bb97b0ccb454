"""Ray fault tolerance through the real CLI: a worker SIGKILLed mid-stage costs a retry, not the run; unusable
``ray.*`` settings are refused at once (issue 22, item 4)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_parquet_shards, make_png_shards, tiny_clip_overrides

pytest.importorskip("ray")

KILL_HOOK = (
    "import os, sys, time\n"
    "if os.environ.get('KILL_DIR') and any('default_worker' in a for a in sys.argv):\n"
    "    import pyarrow.parquet as pq\n"
    "    _real = pq.write_table\n"
    "    def write_table(*a, **k):\n"
    "        try:\n"
    "            fd = os.open(os.path.join(os.environ['KILL_DIR'], 'busy'), os.O_CREAT | os.O_EXCL | os.O_WRONLY)\n"
    "        except FileExistsError:\n"
    "            return _real(*a, **k)\n"
    "        os.write(fd, str(os.getpid()).encode())\n"
    "        os.close(fd)\n"
    "        time.sleep(600)\n"
    "    pq.write_table = write_table\n")


def cli(*args: str, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "datapruning.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def run_args(inp: Path, out: Path, *sets: str) -> list[str]:
    sets = (*(() if any(s.startswith("embed.model_config") for s in sets) else ("embed.encoder=precomputed",)),
            "cluster.k=4", "cluster.niter=5", *sets)
    return ["run", "--input", str(inp), "--output", str(out), *[x for s in sets for x in ("--set", s)]]


def snapshot(out: Path) -> dict[str, bytes]:
    files = sorted((out / "manifest").glob("*.parquet")) + [out / "kept.parquet"]
    return {f.name: f.read_bytes() for f in files}


@pytest.mark.parametrize("kind", ["task", "embed actor"])
def test_a_worker_killed_mid_stage_costs_a_retry_not_the_run(tmp_path, tiny_clip_config, kind):
    """The first parquet write in any Ray worker parks that worker: a busy task (precomputed shards, the embed
    stage's tasks) or the embedding actor (tar shards, the tiny CLIP model); it is SIGKILLed there. Ray runs the
    task again (restarts the actor, which builds its model again), and the one run completes with the manifest
    of a local run."""
    if kind == "task":
        inp, sets = tmp_path / "emb", ()
        make_parquet_shards(inp, n_shards=4, per_shard=50)
    else:
        inp, sets = tmp_path / "shards", tuple(tiny_clip_overrides(tiny_clip_config))
        make_png_shards(inp, n_shards=3, per_shard=6)
    ref = cli(*run_args(inp, tmp_path / "ref", *sets))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    hook, flags = tmp_path / "hook", tmp_path / "flags"
    hook.mkdir()
    flags.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "KILL_DIR": str(flags)}
    proc = cli(*run_args(inp, tmp_path / "ray", *sets, "backend=ray", "ray.num_cpus=2"), env=env)
    deadline = time.time() + 240
    while not (flags / "busy").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert (flags / "busy").exists(), f"no worker got busy (exit {proc.poll()}): {proc.stderr.read()[-2000:]}"
    time.sleep(0.2)
    worker = int((flags / "busy").read_text())
    os.kill(worker, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert snapshot(tmp_path / "ray") == snapshot(tmp_path / "ref")
    assert not list((tmp_path / "ray").rglob("*.tmp")), "the killed worker's temporary file survived the run"


@pytest.mark.parametrize("setting, message", [
    ("ray.num_cpus=0", "config key 'ray.num_cpus': must be in [1, "),
    ("ray.address=not-an-address", "config key 'ray.address': expected auto, host:port"),
    ("ray.address=127.0.0.1:9", "ray.address 127.0.0.1:9: nothing answers there"),
])
def test_unusable_ray_settings_are_one_line(tmp_path, setting, message):
    """Refused before any stage runs, in one line (an unreachable address is not retried for minutes; the
    timeout below only guards against a hang)."""
    inp = tmp_path / "emb"
    make_parquet_shards(inp, n_shards=2, per_shard=10)
    proc = cli(*run_args(inp, tmp_path / "run", "backend=ray", setting))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert not (tmp_path / "run" / "manifest").exists()
