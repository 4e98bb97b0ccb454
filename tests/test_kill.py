"""SIGKILL the real CLI at random moments in every stage, many times; every rerun must complete with a
manifest byte-identical to an uninterrupted run, and no temporary file may be taken for a finished one."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path


from conftest import make_parquet_shards, make_png_shards, tiny_clip_overrides

STAGE_DIRS = ["embeddings", "clusters", "scores", "select", "manifest"]


def cli_args(inp: Path, out: Path, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "datapruning.cli", "run", "--input", str(inp), "--output", str(out),
            *[x for s in sets for x in ("--set", s)]]


def snapshot(out: Path) -> dict[str, bytes]:
    files = sorted((out / "manifest").glob("*.parquet")) + [out / "kept.parquet"]
    return {f.name: f.read_bytes() for f in files}


STAGE_LOG = {"embeddings": "embed", "clusters": "cluster", "scores": "score", "select": "select",
             "manifest": "manifest"}


def kill_somewhere(args: list[str], rng: random.Random) -> str:
    """Start the run, wait until its log says it began a randomly chosen stage (or a later one), sleep a
    random 0-250 ms, SIGKILL. Returns the stage the process was in when killed, or 'finished'."""
    names = [STAGE_LOG[d] for d in STAGE_DIRS]
    target = rng.randrange(len(names))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(
        line.rsplit("stage ", 1)[1].strip() for line in proc.stderr if " datapruning: stage " in line), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not any(names.index(s) >= target for s in seen):
        time.sleep(0.002)
    time.sleep(0.25 * rng.random() ** 3)  # mostly soon after the stage starts: stages on small data are quick
    if proc.poll() is not None:
        return "finished"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return seen[-1] if seen else "startup"


def kill_and_resume(tmp_path: Path, inp: Path, sets: list[str], kills: int, seed: int) -> Counter:
    ref = tmp_path / "ref"
    assert subprocess.run(cli_args(inp, ref, sets), capture_output=True).returncode == 0
    expected = snapshot(ref)
    rng, landed = random.Random(seed), Counter()
    for i in range(kills):
        out = tmp_path / f"run{i}"
        for _ in range(rng.randint(1, 3)):  # one to three kills in a row on the same folder
            landed[kill_somewhere(cli_args(inp, out, sets), rng)] += 1
        rerun = subprocess.run(cli_args(inp, out, sets), capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert snapshot(out) == expected, f"manifest differs after kills in run{i}: {landed}"
        assert not list(out.rglob("*.tmp")), "a temporary file survived a finished run"
    return landed


def record(name: str, landed: Counter, kills: int) -> None:
    folder = Path(os.environ.get("DATAPRUNING_ARTIFACTS", "test-artifacts"))
    folder.mkdir(exist_ok=True)
    (folder / f"kill-{name}.json").write_text(json.dumps({"runs": kills, "kill_points": dict(landed),
                                                          "lost_or_differing_manifests": 0}, indent=1))


def test_random_kills_precomputed(tmp_path, long_mode):
    inp = tmp_path / "emb"
    make_parquet_shards(inp, n_shards=6, per_shard=400, d=32, k=8)
    kills = 24 if long_mode else 5
    landed = kill_and_resume(tmp_path, inp, ["embed.encoder=precomputed", "cluster.k=8"], kills, seed=1)
    record("precomputed", landed, kills)


def test_random_kills_tar_shards(tmp_path, tiny_clip_config, long_mode):
    inp = tmp_path / "shards"
    make_png_shards(inp, n_shards=5, per_shard=24)
    kills = 12 if long_mode else 3
    landed = kill_and_resume(tmp_path, inp, tiny_clip_overrides(tiny_clip_config), kills, seed=2)
    record("tar", landed, kills)


def test_failed_write_stops_cleanly_then_resumes(tmp_path, parquet_shards):
    """A disk-full error on the 4th parquet write (injected through sitecustomize in the real process)
    stops the run with a one-line message naming the file; the next run resumes and completes."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, os, pyarrow.parquet as pq\n"
        "_real, _n = pq.write_table, [0]\n"
        "def write_table(*a, **k):\n"
        "    _n[0] += 1\n"
        "    if _n[0] == 4 and os.environ.get('FAIL_WRITE'):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return _real(*a, **k)\n"
        "pq.write_table = write_table\n")
    out = tmp_path / "run"
    args = cli_args(parquet_shards[0].parent, out, ["embed.encoder=precomputed", "cluster.k=4"])
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "FAIL_WRITE": "1"}
    failed = subprocess.run(args, capture_output=True, text=True, env=env)
    assert failed.returncode == 2
    errors = [line for line in failed.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "cannot write" in errors[0]
    assert not list(out.rglob("*.tmp"))
    env.pop("FAIL_WRITE")
    assert subprocess.run(args, capture_output=True, env=env).returncode == 0
    ref = tmp_path / "ref"
    subprocess.run(cli_args(parquet_shards[0].parent, ref, ["embed.encoder=precomputed", "cluster.k=4"]), check=True,
                   capture_output=True)
    assert snapshot(out) == snapshot(ref)


BLOCK_HOOK = (
    "import os, time, multiprocessing\n"
    "def _block(real):\n"
    "    def wrapper(*a, **k):\n"
    "        if multiprocessing.parent_process() is not None:\n"
    "            open(os.path.join(os.environ['BLOCK_DIR'], str(os.getpid())), 'w').close()\n"
    "            time.sleep(600)\n"
    "        return real(*a, **k)\n"
    "    return wrapper\n"
    "if os.environ.get('BLOCK_DIR'):\n"
    "    import pyarrow.parquet as pq, tarfile\n"
    "    pq.write_table = _block(pq.write_table)\n"
    "    tarfile.TarFile.addfile = _block(tarfile.TarFile.addfile)\n")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_parent_of_blocked_workers(tmp_path: Path, args: list[str], workers: int = 2,
                                   hook_code: str = BLOCK_HOOK) -> list[int]:
    """Run ``args`` with a hook that parks every pool worker (in a write, by default); once ``workers`` are
    parked, SIGKILL the parent. Returns the workers still alive 5 s later (killed afterwards, so none outlives
    the test)."""
    hook, block = tmp_path / "hook", tmp_path / "blocked"
    hook.mkdir(exist_ok=True)
    block.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(hook_code)
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "BLOCK_DIR": str(block), "DATAPRUNING_POOL_AFTER_S": "0"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(block.iterdir())) < workers and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    pids = [int(p.name) for p in block.iterdir()]
    assert len(pids) == workers, f"workers never started (exit {proc.poll()})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(5)
    survivors = [pid for pid in pids if not _gone(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    return survivors


def test_pool_workers_die_with_a_killed_run(tmp_path):
    inp = tmp_path / "emb"
    make_parquet_shards(inp, n_shards=4, per_shard=20)
    args = cli_args(inp, tmp_path / "run", ["embed.encoder=precomputed", "cluster.k=2", "workers=2"])
    assert kill_parent_of_blocked_workers(tmp_path, args) == []


def test_reshard_workers_die_with_a_killed_reshard(tmp_path, tiny_clip_config):
    from conftest import make_tiny_run

    run = make_tiny_run(tmp_path, tiny_clip_config, n_shards=3, per_shard=6)
    args = [sys.executable, "-m", "datapruning.cli", "reshard", str(run), "--output", str(tmp_path / "re"),
            "-n", "2", "-w", "2"]
    assert kill_parent_of_blocked_workers(tmp_path, args) == []


def test_rerun_of_a_killed_reshard_removes_its_temporary_tars(tmp_path, tiny_clip_config):
    from conftest import make_tiny_run

    from datapruning.consumers.reshard import reshard

    run = make_tiny_run(tmp_path, tiny_clip_config, n_shards=2, per_shard=6)
    out = tmp_path / "re"
    left = out / ".00000000.tar.p999999999@gone.x1.tmp"  # what a reshard killed while assembling leaves
    out.mkdir()
    reshard(run, out, 4)
    left.write_bytes(b"\0" * 4096)
    (out / "_reshard.json").write_text((out / "_reshard.json").read_text().replace('"complete": true',
                                                                                  '"complete": false'))
    reshard(run, out, 4)
    assert not list(out.rglob("*.tmp"))
