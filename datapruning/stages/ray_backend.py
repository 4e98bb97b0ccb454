"""Ray backend: per-shard work as Ray tasks, embedding in actors that load the model once, the k-means fit
on one (GPU) worker, SemDeDup spread over groups of clusters. Same files and bytes as ``backend: local``.

Workers read input shards through fsspec (any URL the driver can name) and write into the run folder, so
on a multi-machine cluster OUTPUT must be a path every node sees (NFS, a mounted bucket).
"""
from __future__ import annotations

import heapq
import inspect
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from ..config import config_from_dict, to_dict

log = logging.getLogger("datapruning")

TABLE_FORMATS = ("parquet", "clip_retrieval", "npy")


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("backend: ray needs Ray: pip install 'ray[default]' (or pip install 'datapruning[ray]')") from exc
    return ray


def ensure_ray(cfg):
    """Connect to ``ray.address`` (or start a local instance) unless Ray is already initialised."""
    ray = _ray()
    if not ray.is_initialized():
        kwargs = {"address": cfg.ray.address, "log_to_driver": True}
        if cfg.ray.address is None and cfg.ray.num_cpus is not None:
            kwargs["num_cpus"] = cfg.ray.num_cpus  # only for a new local instance: Ray refuses it when connecting
        log.info("ray: %s", f"connecting to {cfg.ray.address}" if cfg.ray.address else "starting a local instance")
        ray.init(**kwargs)
    return ray


def cluster_gpus(ray) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def largest_node_cpus(ray) -> int:
    cpus = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(max(cpus, default=1)))


def _unwrap(ray, fn, *args):
    """``fn(*args)``, re-raising a failed task's own exception (one-line CLI errors keep working)."""
    try:
        return fn(*args)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


# ---- per-shard stages -------------------------------------------------------------------------------

def _run_shard(cfg_dict: dict, stage: str, shard: dict, out_dir: str) -> dict:
    from .backends import work_fn

    return work_fn(stage)(config_from_dict(cfg_dict), shard, Path(out_dir))


class EmbedWorker:
    """One embedding actor: ``setup`` builds the encoder once (on its GPU when it has one), then
    ``process`` embeds shard after shard with it; ``teardown`` frees it."""

    def __init__(self, cfg_dict: dict):
        self.cfg = config_from_dict(cfg_dict)

    def setup(self) -> str:
        from .embed import get_encoder

        return get_encoder(self.cfg).name

    def process(self, shard: dict, out_dir: str) -> dict:
        from .embed import embed_one

        return embed_one(self.cfg, shard, Path(out_dir))

    def teardown(self) -> None:
        from .embed import _ENCODER_CACHE

        _ENCODER_CACHE.clear()


def _drain(ray, pending: dict) -> Iterator[tuple]:
    """Wait for one finished task; yields (key, info)."""
    done, _ = ray.wait(list(pending), num_returns=1)
    for ref in done:
        key = pending.pop(ref)
        yield key, _unwrap(ray, ray.get, ref)


def _map_tasks(ray, cfg_dict: dict, stage: str, shards: list[dict], out_dir: str) -> Iterator[dict]:
    task = ray.remote(num_cpus=1, max_retries=0)(_run_shard)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict = {}
    for shard in shards:
        pending[task.remote(cfg_dict, stage, shard, out_dir)] = shard["name"]
        while len(pending) >= window:
            for _, info in _drain(ray, pending):
                yield info
    while pending:
        for _, info in _drain(ray, pending):
            yield info


CPUS_PER_CPU_ACTOR = 4  # without GPUs: a model copy per 4 CPUs (torch threads) rather than one per CPU


def embed_actor_options(cfg, ray) -> tuple[dict, int]:
    """Actor resources and pool size: one actor per ``ray.embed_gpus`` GPUs when the cluster has GPUs
    (and embed.device is not cpu), else one actor per ``CPUS_PER_CPU_ACTOR`` CPUs."""
    gpus = cluster_gpus(ray)
    if gpus > 0 and cfg.embed.device != "cpu":
        return {"num_gpus": cfg.ray.embed_gpus, "num_cpus": 1}, max(1, int(gpus / cfg.ray.embed_gpus))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per = min(CPUS_PER_CPU_ACTOR, largest_node_cpus(ray))
    return {"num_cpus": per}, max(1, cpus // per)


def _map_actors(ray, cfg, cfg_dict: dict, shards: list[dict], out_dir: str) -> Iterator[dict]:
    options, slots = embed_actor_options(cfg, ray)
    actor_cls = ray.remote(**options)(EmbedWorker)
    actors = [actor_cls.remote(cfg_dict) for _ in range(min(slots, len(shards)))]
    try:
        names = _unwrap(ray, ray.get, [a.setup.remote() for a in actors])
        log.info("ray: %d embedding actors (%s) with %s", len(actors), options, names[0])
        queue = list(shards)
        pending = {}
        for actor in actors:
            if queue:
                pending[actor.process.remote(queue.pop(0), out_dir)] = actor
        while pending:
            for actor, info in _drain(ray, pending):
                yield info
                if queue:
                    pending[actor.process.remote(queue.pop(0), out_dir)] = actor
        ray.get([a.teardown.remote() for a in actors])
    finally:
        for actor in actors:
            ray.kill(actor)


def ray_map_shards(cfg, stage: str, shards: list[dict], out_dir: Path) -> Iterator[dict]:
    """``map_shards`` for ``backend: ray``: embedding of image/text shards in model-holding actors,
    everything else (assignment, precomputed-embedding copies) as one Ray task per shard."""
    ray = ensure_ray(cfg)
    cfg_dict = to_dict(cfg)
    out = str(out_dir)
    if stage == "embed":
        models = [s for s in shards if s["format"] not in TABLE_FORMATS]
        tables = [s for s in shards if s["format"] in TABLE_FORMATS]
        if models:
            yield from _map_actors(ray, cfg, cfg_dict, models, out)
        shards = tables
    if shards:
        yield from _map_tasks(ray, cfg_dict, stage, shards, out)


# ---- the k-means fit --------------------------------------------------------------------------------

def _fit_task(cfg_dict: dict, output: str, counts: list, idx: np.ndarray):
    from .cluster import fit_sample

    return fit_sample(config_from_dict(cfg_dict), Path(output), counts, idx)


def ray_fit(cfg, output: Path, counts: list, idx: np.ndarray) -> tuple[np.ndarray, dict]:
    """Run the k-means fit as one Ray task: on a GPU when the cluster has one (and cluster.backend is
    not faiss), else on a whole CPU node. The worker gathers the sample from the run folder itself."""
    ray = ensure_ray(cfg)
    if cluster_gpus(ray) > 0 and cfg.cluster.backend != "faiss":
        options = {"num_gpus": 1, "num_cpus": 1}
    else:
        options = {"num_cpus": largest_node_cpus(ray)}
    task = ray.remote(max_retries=0, **options)(_fit_task)
    centroids, stats = _unwrap(ray, ray.get, task.remote(to_dict(cfg), str(output), counts, idx))
    stats["ray"] = options
    return centroids, stats


# ---- SemDeDup over groups of clusters -----------------------------------------------------------------

def balanced_groups(cluster: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """Split the rows with a cluster id >= 0 into ``n_groups`` sets of whole clusters with about equal
    SemDeDup work (sum of size²): largest cluster first onto the lightest group. Rows stay sorted."""
    cluster = np.asarray(cluster, dtype=np.int64)
    valid = cluster >= 0
    sizes = np.bincount(cluster[valid]) if valid.any() else np.zeros(0, np.int64)
    ids = np.flatnonzero(sizes > 0)
    n_groups = max(1, min(int(n_groups), len(ids)))
    heap = [(0, g) for g in range(n_groups)]
    owner = np.full(len(sizes), -1, dtype=np.int64)
    for cid in ids[np.argsort(-sizes[ids], kind="stable")]:
        load, g = heapq.heappop(heap)
        owner[cid] = g
        heapq.heappush(heap, (load + int(sizes[cid]) ** 2, g))
    group_of = np.where(valid, owner[np.where(valid, cluster, 0)], -1)
    return [rows for rows in (np.flatnonzero(group_of == g) for g in range(n_groups)) if len(rows)]


def _semdedup_group(embeddings, cluster, position, seed: int, block_rows: int) -> np.ndarray:
    from ..metrics.semdedup import semdedup_scores

    # ``position`` (the global keep order, unique) makes "easy" order exactly the global order
    return semdedup_scores(embeddings, cluster, position, "easy", seed, block_rows)


def distributed_semdedup_scores(embeddings: np.ndarray, cluster: np.ndarray, cos_dist: np.ndarray, mode: str,
                                seed: int, block_rows: int, ray=None) -> np.ndarray:
    """``semdedup_scores`` with groups of whole clusters as Ray tasks; the same float64 scores.
    The keep order is ranked once over all rows (its seeded tie-break spans all of them), and each
    task receives every row's global position in that order as its sort key."""
    from ..metrics.semdedup import FIRST_SCORE
    from ..select import rank_order

    ray = ray or _ray()
    n = len(cluster)
    out = np.full(n, FIRST_SCORE, dtype=np.float64)
    position = np.empty(n, dtype=np.float64)
    position[rank_order(np.asarray(cos_dist, dtype=np.float64), mode, seed)] = np.arange(n, dtype=np.float64)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1, max_retries=0)(_semdedup_group)
    pending: dict = {}
    for rows in balanced_groups(cluster, 4 * cpus):
        ref = task.remote(np.ascontiguousarray(embeddings[rows], dtype=np.float32), cluster[rows], position[rows],
                          seed, block_rows)
        pending[ref] = rows
        while len(pending) > cpus:  # bound the copies held in the object store
            for rows_done, sub in _drain(ray, pending):
                out[rows_done] = sub
    while pending:
        for rows_done, sub in _drain(ray, pending):
            out[rows_done] = sub
    return out


def ray_score_semdedup(inp, **params):
    """The ``semdedup`` metric with its cluster loop on Ray; parameters, scores and info as the local one."""
    from ..metrics import semdedup as sd
    from ..metrics.base import MetricOutput

    bound = inspect.signature(sd.score_semdedup).bind(inp, **params)  # same TypeError as the local metric
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k != "inp"}
    if set(args) != {"mode", "block_rows", "eps", "seed"}:
        log.warning("semdedup: unknown parameters for the Ray path %s; running it on the driver", sorted(args))
        return sd.score_semdedup(inp, **params)
    seed = inp.seed if args["seed"] is None else args["seed"]
    scores = distributed_semdedup_scores(inp.embeddings, inp.cluster, inp.cos_dist, args["mode"], seed,
                                         int(args["block_rows"]), ensure_ray_running())
    removed = sd.removed_counts(scores, args["eps"])
    info = {"mode": args["mode"], "block_rows": int(args["block_rows"]), "n": int(len(scores)),
            "removed": {str(e): c for e, c in removed.items()},
            "eps_for_keep_fraction": {str(f): sd.eps_for_keep_fraction(scores, f) for f in sd.REPORT_KEEP_FRACTIONS}}
    return MetricOutput(scores, info)


def ensure_ray_running():
    ray = _ray()
    if not ray.is_initialized():
        raise RuntimeError("ray_score_semdedup: Ray is not initialised; call ensure_ray(cfg) first")
    return ray


# metrics with a Ray implementation: name -> fn(ScoreInputs, **params) -> MetricOutput
RAY_METRICS = {"semdedup": ray_score_semdedup}


def ray_metric(cfg, name: str, default):
    """The Ray version of metric ``name`` when there is one (Ray started on demand), else ``default``."""
    if name not in RAY_METRICS:
        return default
    ensure_ray(cfg)
    return RAY_METRICS[name]
