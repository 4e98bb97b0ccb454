"""Chaos in CI: concurrent runs on one folder, and a shard server that fails often; results stay exact."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from conftest import make_parquet_shards, make_png_shards, tiny_clip_overrides

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


class FlakyShards:
    """A shard server on 127.0.0.1 only: serves one folder's files (HEAD, GET, byte ranges), and fails a
    ``rate`` share of requests, seeded: half of them with 503, half by cutting the body short. Names in
    ``down`` always fail. Bounded: at most ``limit`` requests, each socket times out after 10 s."""

    def __init__(self, folder: Path, rate: float = 0.0, seed: int = 0, limit: int = 5000):
        import http.server
        import threading

        self.folder, self.rate, self.rng, self.limit = folder, rate, random.Random(seed), limit
        self.down: set[str] = set()
        self.requests = self.failed = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                server.respond(self, head=True)

            def do_GET(self):
                server.respond(self, head=False)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def respond(self, handler, head: bool) -> None:
        self.requests += 1
        name = handler.path.lstrip("/").split("?")[0]
        path = self.folder / name
        if self.requests > self.limit or "/" in name or not path.is_file():
            handler.send_error(404 if not path.is_file() else 429)
            return
        data = path.read_bytes()
        lo, hi = 0, len(data)
        if handler.headers.get("Range", "").startswith("bytes="):
            a, b = handler.headers["Range"][6:].split("-")
            lo, hi = int(a or 0), min(len(data), int(b) + 1 if b else len(data))
        fail = name in self.down or self.rng.random() < self.rate
        self.failed += fail
        if fail and (name in self.down or self.rng.random() < 0.5 or head):
            handler.send_error(503)
            return
        handler.send_response(206 if lo or hi < len(data) else 200)
        handler.send_header("Content-Length", str(hi - lo))
        handler.send_header("Accept-Ranges", "bytes")
        if lo or hi < len(data):
            handler.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(data)}")
        handler.end_headers()
        if not head:
            handler.wfile.write(data[lo:hi] if not fail else data[lo:lo + (hi - lo) // 3])
        if fail:
            handler.close_connection = True

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def http_run(url: str, out: Path, clip_cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [*tiny_clip_overrides(clip_cfg), "input.retry_backoff_s=0.01", *extra]
    args = [sys.executable, "-m", "datapruning.cli", "run", "--input", f"{url}/{{00000..00003}}.tar", "--output",
            str(out), *[x for s in sets for x in ("--set", s)]]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_flaky_shard_server_gives_the_clean_manifest(tmp_path, tiny_clip_config):
    """30% of requests fail (503 or a cut body): after retries the manifest equals a clean run's; a shard
    that stays down is failed (exit 2, named), left out only with --allow-failed-shards, retried on rerun."""
    make_png_shards(tmp_path / "shards", n_shards=4, per_shard=6)
    server = FlakyShards(tmp_path / "shards")
    try:
        clean = http_run(server.url, tmp_path / "clean", tiny_clip_config)
        assert clean.returncode == 0, clean.stderr[-2000:]
        server.rate = 0.3
        flaky = http_run(server.url, tmp_path / "flaky", tiny_clip_config, "input.retries=10")
        assert flaky.returncode == 0, flaky.stderr[-2000:]
        assert server.failed > 0
        assert snapshot(tmp_path / "flaky") == snapshot(tmp_path / "clean")
        assert json.loads((tmp_path / "flaky" / "stats.json").read_text())["skipped"] == {}

        server.rate, server.down = 0.0, {"00002.tar"}
        down = http_run(server.url, tmp_path / "down", tiny_clip_config, "input.retries=2")
        assert down.returncode == 2
        assert "1 of 4 shards could not be read after 2 retries: 00002" in down.stderr
        assert not (tmp_path / "down" / "manifest").exists()
        allowed = http_run(server.url, tmp_path / "down", tiny_clip_config, "input.retries=2",
                           "input.allow_failed_shards=true")
        assert allowed.returncode == 0, allowed.stderr[-2000:]
        assert "left out 1 shard(s) that could not be read (a rerun retries them): 00002" in allowed.stdout
        assert json.loads((tmp_path / "down" / "stats.json").read_text())["samples_in"] == 18
        server.down = set()
        healed = http_run(server.url, tmp_path / "down", tiny_clip_config)
        assert healed.returncode == 0, healed.stderr[-2000:]
        assert snapshot(tmp_path / "down") == snapshot(tmp_path / "clean")
    finally:
        server.close()
