"""A two-node Ray cluster on this machine (``ray start --head`` plus ``ray start --address``, each node with its
own CPU) runs every stage and writes the same manifest bytes as ``backend: local``."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datapruning.config import load_config
from datapruning.runner import run_pipeline
from test_streaming import CASES, write_embedding_shards

pytest.importorskip("ray")
RAY = shutil.which("ray") or str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict) -> subprocess.Popen:
    """``ray start ... --block`` in its own process group, so the test can stop exactly this node."""
    return subprocess.Popen([RAY, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                             "--object-store-memory=100000000", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The head node and one worker node, each with 1 CPU; yields (address, env for clients)."""
    port = _free_port()
    # its own temp dir: the nodes do not become "the" cluster that a bare ray.init() elsewhere would join
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray"))}
    head = _start(["--head", f"--port={port}", "--include-dashboard=false", '--resources={"head_node": 1}'], env)
    address = f"127.0.0.1:{port}"
    workers = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        workers.append(_start([f"--address={address}", '--resources={"second_node": 1}'], env))
        check = ("import ray, time; ray.init(address='%s', _node_ip_address='127.0.0.1'); t = time.time()\n"
                 "while len([n for n in ray.nodes() if n['Alive']]) < 2 and time.time() - t < 90: time.sleep(0.5)\n"
                 "print(len([n for n in ray.nodes() if n['Alive']]))" % address)
        alive = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=180)
        assert alive.stdout.strip().endswith("2"), ("the second node did not join", alive.stderr[-2000:])
        yield address, env
    finally:
        for proc in [*workers, head]:
            _stop(proc)


def test_two_node_cluster_gives_the_local_manifest(two_nodes, tmp_path):
    """The CLI, as a user runs it against the cluster, in its own process."""
    address, env = two_nodes
    inp = write_embedding_shards(tmp_path / "emb", n_shards=6, per_shard=150)
    args = ["embed.encoder=precomputed", "cluster.k=6", "cluster.partition_mib=1", *CASES["semdedup_dbp"]]
    run_pipeline(load_config(None, args), str(inp), tmp_path / "local")
    sets = [x for a in [*args, "backend=ray", f"ray.address={address}"] for x in ("--set", a)]
    proc = subprocess.run([sys.executable, "-m", "datapruning.cli", "run", "--input", str(inp), "--output",
                           str(tmp_path / "ray"), *sets], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["kept.parquet", *sorted(p.name for p in (tmp_path / "local" / "manifest").glob("*.parquet"))]:
        sub = "" if name == "kept.parquet" else "manifest"
        assert (tmp_path / "local" / sub / name).read_bytes() == (tmp_path / "ray" / sub / name).read_bytes(), name
    ran = [line.split("datapruning: ", 1)[-1] for line in proc.stderr.splitlines() if "datapruning: ray: " in line]
    # score (cluster groups, shards), select passes and manifest shards all ran as tasks, on both nodes
    for fn in ("score_group", "score_shards", "_apply", "manifest_shard"):
        assert any(f"of {fn} ran" in m for m in ran), (fn, ran)
    assert any(m.endswith("on 2 nodes") for m in ran if "manifest_shard" in m or "score_shard" in m), ran
