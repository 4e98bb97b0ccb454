"""The run-folder lock: one writer, the holder named, dead holders taken over safely, readers kept out."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datapruning.io import lock
from datapruning.io import files
from datapruning.io.files import clean_temp

HOLD = ("import sys, time; from datapruning.io.lock import acquire; acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(float(sys.argv[2]))")


def holder(folder: Path, seconds: float = 30) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    proc = holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(lock.RunFolderBusy) as err:
            lock.acquire(tmp_path)
        assert time.monotonic() - start < 1
        msg = str(err.value)
        assert f"run folder {tmp_path} is in use by pid {proc.pid} on host {socket.gethostname()} since" in msg
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / lock.LOCK_NAME).exists()
    with lock.locked(tmp_path):
        assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / lock.LOCK_NAME).exists()


def write_lock(folder: Path, owner: str = "t0", **info) -> Path:
    path = folder / lock.LOCK_NAME
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then", "token": owner, **info}))
    return path


def test_other_host_lock_is_stale_only_without_heartbeat(tmp_path):
    path = write_lock(tmp_path)
    with pytest.raises(lock.RunFolderBusy, match="in use by pid 1 on host elsewhere since then"):
        lock.acquire(tmp_path)  # fresh heartbeat: the other host's run may be alive
    old = time.time() - lock.STALE_S - 5
    os.utime(path, (old, old))
    with lock.locked(tmp_path):
        assert json.loads(path.read_text())["host"] == socket.gethostname()


def test_reused_pid_is_not_taken_for_the_holder(tmp_path):
    write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), pid_start="-1")
    with lock.locked(tmp_path):
        assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_release_never_removes_a_lock_taken_by_another(tmp_path):
    lock.acquire(tmp_path)
    write_lock(tmp_path, "someone-else")
    lock.release(tmp_path)
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == 1


def test_lost_lock_is_noticed_by_the_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    lock.acquire(tmp_path)
    try:
        write_lock(tmp_path, "thief")
        time.sleep(0.3)
        with pytest.raises(lock.RunFolderBusy, match="took over its lock"):
            lock.ensure(tmp_path)
    finally:
        lock.release(tmp_path, force=True)


RACE = ("import sys, time; from datapruning.io.lock import acquire, RunFolderBusy\n"
        "time.sleep(max(0, float(sys.argv[2]) - time.time()))\n"
        "try:\n    acquire(sys.argv[1]); print('won', flush=True); time.sleep(1.5)\n"
        "except RunFolderBusy:\n    print('busy', flush=True)\n")


def test_many_processes_taking_over_one_stale_lock_leave_one_winner(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lock(tmp_path, pid=int(dead.stdout), host=socket.gethostname())
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(start)], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["busy"] * 5 + ["won"], outs


def test_readers_refuse_a_folder_being_written(tmp_path):
    from datapruning.run import load_run_config

    proc = holder(tmp_path)
    try:
        with pytest.raises(lock.RunFolderBusy, match="in use by pid .* wait for it to finish"):
            load_run_config(tmp_path)
    finally:
        proc.kill()
        proc.wait()


def test_clean_temp_keeps_the_temporary_files_of_a_live_process(tmp_path):
    host = files._HOST
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        live = tmp_path / f".x.parquet.p{proc.pid}@{host}.abc.tmp"
        gone = tmp_path / f".y.parquet.p{int(dead.stdout)}@{host}.abc.tmp"
        legacy = tmp_path / ".z.parquet.abc.tmp"
        for f in (live, gone, legacy):
            f.write_bytes(b"x")
        assert clean_temp(tmp_path) == 2
        assert live.exists() and not gone.exists() and not legacy.exists()
    finally:
        proc.kill()
        proc.wait()


# ---- stage-by-stage runs stay consistent ---------------------------------------------------------------

def precomputed_run(tmp_path):
    from conftest import make_parquet_shards

    from datapruning.cli import main

    inp = tmp_path / "emb"
    make_parquet_shards(inp, n_shards=2, per_shard=30)
    out = tmp_path / "run"
    base = ["--set", "embed.encoder=precomputed", "--set", "cluster.k=4", "--set", "cluster.niter=5"]
    assert main(["run", "--input", str(inp), "--output", str(out), *base]) == 0
    return out, main


def test_a_stage_refuses_upstream_outputs_of_another_config(tmp_path, capsys):
    out, main = precomputed_run(tmp_path)
    assert main(["score", "--output", str(out), "--set", "cluster.k=2"]) == 2
    err = capsys.readouterr().err
    assert "the cluster stage" in err and "cluster.k" in err and "rerun 'datapruning cluster'" in err


def test_set_given_to_a_later_stage_is_saved_and_used_by_the_next(tmp_path):
    out, main = precomputed_run(tmp_path)
    assert main(["select", "--output", str(out), "--set", "select.keep_fraction=0.3"]) == 0
    assert not (out / "stats.json").exists() and not (out / "kept.parquet").exists()  # made by the old config
    assert main(["manifest", "--output", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["config"]["select"]["keep_fraction"] == 0.3
    assert stats["kept"] == 18
    assert json.loads((out / "_meta" / "select" / "stage.json").read_text())["config"]["select"]["keep_fraction"] == 0.3


def test_top_level_outputs_do_not_outlive_their_config(tmp_path):
    from datapruning.config import load_config
    from datapruning.run import Run, prepare_stage

    out, main = precomputed_run(tmp_path)
    (out / "eval").mkdir()
    (out / "eval" / "summary.json").write_text("{}")
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=3", "cluster.niter=5"])
    with lock.locked(out):
        prepare_stage(Run(cfg, out), "cluster")  # a rerun with a new k, killed right after it starts
    assert not (out / "kept.parquet").exists() and not (out / "stats.json").exists()
    assert not (out / "eval").exists()
    assert json.loads((out / "config.json").read_text())["cluster"]["k"] == 3
