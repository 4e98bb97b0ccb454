"""One executor per command: a process pool starts at most once, only when the work pays for it, and is reused."""
from __future__ import annotations

import time

import datapruning.exec as ex
from conftest import make_parquet_shards
from datapruning.config import load_config
from datapruning.runner import run_pipeline


def _square(x: int) -> int:
    return x * x


def _slow(x: int) -> int:
    time.sleep(0.3)
    return x


def test_pool_starts_once_per_command_and_only_when_the_work_pays(monkeypatch, tmp_path):
    started = []
    real = ex.process_pool
    monkeypatch.setattr(ex, "process_pool", lambda workers: started.append(workers) or real(workers))
    make_parquet_shards(tmp_path / "in", n_shards=4, per_shard=60, d=16, k=4)
    cfg = load_config(None, ["embed.encoder=precomputed", "cluster.k=4", "workers=2"])
    run_pipeline(cfg, str(tmp_path / "in"), tmp_path / "small")
    assert started == []  # every pass of a 240-row run is cheaper than a pool
    monkeypatch.setenv(ex.POOL_AFTER_ENV, "0")
    run_pipeline(cfg, str(tmp_path / "in"), tmp_path / "forced")
    assert started == [2]  # one pool for every stage and pass of the command (the select stage alone makes 8)


def test_pool_executor_keeps_order_free_results_and_closes():
    with ex.open_executor(load_config(None, ["workers=2"])) as pool:
        assert isinstance(pool, ex.PoolExecutor) and not pool.in_process
        assert sorted(pool.map_unordered(_square, range(5))) == [0, 1, 4, 9, 16]  # fast: in this process
        assert pool._pool is None
        assert sorted(pool.map_unordered(_slow, range(6))) == list(range(6))  # 1.5 s of work: the pool
        first = pool._pool
        assert first is not None and sorted(pool.map_unordered(_square, range(3))) == [0, 1, 4]
        assert pool._pool is first
    assert pool._pool is None
    with ex.open_executor(load_config(None, [])) as here:
        assert type(here) is ex.Executor and here.in_process
