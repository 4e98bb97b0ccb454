"""Execution backends for per-shard work: in-process, a local process pool, or Ray tasks."""
from __future__ import annotations

import importlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

from ..config import config_from_dict, to_dict

# stage -> "module:function" running one shard: fn(cfg, shard_dict, out_dir) -> info dict
WORK = {
    "embed": "datapruning.stages.embed:embed_one",
    "assign": "datapruning.stages.cluster:assign_one",
}


def work_fn(stage: str):
    module, _, name = WORK[stage].partition(":")
    return getattr(importlib.import_module(module), name)


def _run_one(cfg_dict: dict, stage: str, shard: dict, out_dir: str) -> dict:
    return work_fn(stage)(config_from_dict(cfg_dict), shard, Path(out_dir))


def map_shards(cfg, stage: str, shards: list[dict], out_dir: Path) -> Iterator[dict]:
    """Run ``stage`` on every shard and yield each shard's info as it finishes (any order)."""
    if not shards:
        return
    if cfg.backend == "ray":
        from .ray_backend import ray_map_shards

        yield from ray_map_shards(cfg, stage, shards, out_dir)
    elif cfg.workers <= 1 or len(shards) == 1:
        fn = work_fn(stage)
        for shard in shards:
            yield fn(cfg, shard, out_dir)
    else:
        cfg_dict = to_dict(cfg)
        with ProcessPoolExecutor(min(cfg.workers, len(shards)), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_run_one, cfg_dict, stage, s, str(out_dir)) for s in shards]
            for fut in as_completed(futures):
                yield fut.result()
