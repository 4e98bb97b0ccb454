"""Transient faults through the real CLI (issue 22, items 1 and 5): a tar stream that ends early is retried,
then failed, never done; precomputed inputs get the same retries (a first open refused, a remote client's
payload error) as tar shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_parquet_shards, make_png_shards, tiny_clip_overrides
from test_chaos import FlakyShards, snapshot

PRE = ["embed.encoder=precomputed", "cluster.k=4", "cluster.niter=5", "input.retry_backoff_s=0.01"]


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datapruning.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


def sets(items) -> list[str]:
    return [x for s in items for x in ("--set", s)]


class ShortStreams(FlakyShards):
    """Serves a folder on 127.0.0.1 as a plain stream: no size, no byte ranges, the body ends when the connection
    closes (so the client streams it in one GET). The next ``short[name]`` GETs of ``name`` stop at 60% of the
    file: a stream that ends early without any error from the client library. With ``broken[name]`` the next
    GETs announce the full size and send 60% (aiohttp: ClientPayloadError)."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.short, self.broken, self.cut = {}, {}, 0

    def respond(self, handler, head: bool) -> None:
        name = handler.path.lstrip("/").split("?")[0]
        path = self.folder / name
        if "/" in name or not path.is_file():
            handler.send_error(404)
            return
        data, announce = path.read_bytes(), False
        for faults in (self.short, self.broken):
            if not head and faults.get(name, 0) > 0:
                faults[name] -= 1
                self.cut += 1
                announce, data = faults is self.broken, data[: len(data) * 6 // 10]
        handler.send_response(200)
        if announce:
            handler.send_header("Content-Length", str(path.stat().st_size))
        handler.send_header("Connection", "close")
        handler.end_headers()
        if not head:
            handler.wfile.write(data)
        handler.close_connection = True


def test_a_tar_stream_that_ends_early_is_retried_then_failed_never_done(tmp_path, tiny_clip_config):
    """It kept 30 of 144 samples with skipped={} and the shard marked done. Now: cut twice, then whole, gives
    the clean manifest; cut every time, the shard is failed (exit 2, named), and a rerun once it is whole
    gives the clean manifest."""
    make_png_shards(tmp_path / "shards", n_shards=3, per_shard=6)
    server = ShortStreams(tmp_path / "shards")
    args = lambda out, *extra: ("run", "--input", f"{server.url}/{{00000..00002}}.tar", "--output", out,  # noqa: E731
                                *sets([*tiny_clip_overrides(tiny_clip_config), "input.retry_backoff_s=0.01", *extra]))
    try:
        assert cli(*args(tmp_path / "clean")).returncode == 0
        server.short = {"00001.tar": 5}  # (fsspec's size look-ups take some)
        proc = cli(*args(tmp_path / "flaky", "input.retries=6"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert server.cut == 5 and "shard 00001: StreamEnded: the data stopped after" in proc.stderr
        assert snapshot(tmp_path / "flaky") == snapshot(tmp_path / "clean")
        assert json.loads((tmp_path / "flaky" / "stats.json").read_text())["skipped"] == {}
        server.short = {"00001.tar": 1000}
        proc = cli(*args(tmp_path / "down", "input.retries=1"))
        assert proc.returncode == 2
        assert "1 of 3 shards could not be read after 1 retries: 00001" in proc.stderr
        server.short = {}
        healed = cli(*args(tmp_path / "down"))
        assert healed.returncode == 0, healed.stderr[-2000:]
        assert snapshot(tmp_path / "down") == snapshot(tmp_path / "clean")
    finally:
        server.close()


def test_remote_parquet_with_cut_bodies_is_retried(tmp_path):
    """A body cut short of its announced size (aiohttp's ClientPayloadError was a traceback), then 30% of all
    requests failing (503s, cut bodies): retried, the manifest equals the local run's."""
    make_parquet_shards(tmp_path / "emb", n_shards=3, per_shard=40)
    assert cli("run", "--input", tmp_path / "emb", "--output", tmp_path / "ref", *sets(PRE)).returncode == 0
    server = ShortStreams(tmp_path / "emb")
    try:
        server.broken = {"part-001.parquet": 5}  # (fsspec's size look-ups take some)
        proc = cli("run", "--input", f"{server.url}/part-{{000..002}}.parquet", "--output", tmp_path / "cut",
                   *sets(PRE + ["input.retries=6"]))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert server.cut == 5 and "shard part-001: ClientPayloadError" in proc.stderr
    finally:
        server.close()
    flaky = FlakyShards(tmp_path / "emb", rate=0.3, seed=3)
    try:
        proc = cli("run", "--input", f"{flaky.url}/part-{{000..002}}.parquet", "--output", tmp_path / "flaky",
                   *sets(PRE + ["input.retries=10"]))
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        flaky.close()
    assert snapshot(tmp_path / "cut") == snapshot(tmp_path / "flaky") == snapshot(tmp_path / "ref")


REFUSE_HOOK = ("import builtins, os\n"
               "if os.environ.get('REFUSE'):\n"
               "    _real, _left = builtins.open, [int(os.environ['REFUSE_TIMES'])]\n"
               "    def refusing(file, *a, **k):\n"
               "        if isinstance(file, str) and file.endswith(os.environ['REFUSE']) and _left[0] > 0:\n"
               "            _left[0] -= 1\n"
               "            raise PermissionError(13, 'Permission denied', file)\n"
               "        return _real(file, *a, **k)\n"
               "    builtins.open = refusing\n")


def test_a_precomputed_file_that_cannot_be_opened_is_retried_then_failed(tmp_path):
    """A first open refused (a permission, a network mount) stopped the run: now retried like a tar shard;
    still refused after the retries, that shard is failed (exit 2, named) and a rerun reads it."""
    make_parquet_shards(tmp_path / "emb", n_shards=3, per_shard=40)
    assert cli("run", "--input", tmp_path / "emb", "--output", tmp_path / "ref", *sets(PRE)).returncode == 0
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(REFUSE_HOOK)
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "REFUSE": "part-001.parquet", "REFUSE_TIMES": "2"}
    proc = cli("run", "--input", tmp_path / "emb", "--output", tmp_path / "once", *sets(PRE), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shard part-001: PermissionError" in proc.stderr and "retrying" in proc.stderr
    assert snapshot(tmp_path / "once") == snapshot(tmp_path / "ref")
    env["REFUSE_TIMES"] = "1000"
    proc = cli("run", "--input", tmp_path / "emb", "--output", tmp_path / "down", *sets(PRE + ["input.retries=1"]),
               env=env)
    assert proc.returncode == 2
    assert "1 of 3 shards could not be read after 1 retries: part-001" in proc.stderr
    assert cli("run", "--input", tmp_path / "emb", "--output", tmp_path / "down", *sets(PRE)).returncode == 0
    assert snapshot(tmp_path / "down") == snapshot(tmp_path / "ref")
