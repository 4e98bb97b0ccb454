"""Score stage: every configured metric in resumable units (cluster groups, then shards) on the executor.

Writes scores/<shard>.parquet (uid, label code, score_<metric>...) and the stage's info file (last); the
cluster-unit metrics' per-group files (``score.groups``) are removed once every shard is written.
"""
from __future__ import annotations

import shutil
import time
from functools import partial

import numpy as np
import pyarrow as pa

from ..errors import StageError
from ..io.files import atomic_path, is_done, mark_done, read_json, write_json, write_parquet
from ..cluster.parts import embedding_dim, group_rows, read_group
from .groups import gather_scores, group_file, write_group_scores
from ..run import Run, label_index, log, prepare_stage, progress, read_block, run_rows, shard_offsets, timed
from . import METRICS
from .base import Context, score_block


def configured(run: Run) -> list[tuple]:
    """(name, Metric, typed params) for ``score.metrics`` (``runner.check_config`` checked them)."""
    return [(m, METRICS[m], METRICS[m].parse(run.cfg.score.params.get(m), run.cfg.seed)) for m in run.cfg.score.metrics]


def context(run: Run, labels: dict | None) -> Context:
    centroids = np.load(run.layout.centroids, allow_pickle=False)
    return Context(rows=run_rows(run, labels=labels), embedding_rows=run_rows(run, labels=labels, embeddings=True),
                   centroids=centroids, n_classes=len(labels["names"]) if labels else 0, seed=run.cfg.seed,
                   state_dir=run.layout.score_state, labels=labels)


def save_state(path, state: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in state.items()})


def load_state(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def stored_state(run: Run, name: str) -> dict | None:
    """A metric's global state as the score stage kept it (None when it has none)."""
    path = run.layout.score_state / f"{name}.npz"
    return load_state(path) if path.exists() else None


def prepared(run: Run, ctx: Context, name: str, metric, params) -> dict:
    """The metric's global state, computed once and kept in _meta/scores/state/<name>.npz (a rerun reuses it)."""
    if metric.prepare is None:
        return {}
    path = run.layout.score_state / f"{name}.npz"
    if not path.exists():
        start = time.perf_counter()
        save_state(path, metric.prepare(ctx, params))
        log.info("score: %s prepared in %.1fs", name, time.perf_counter() - start)
    return load_state(path)


def parts_dir(run: Run, name: str):
    return run.layout.score_parts / name


STREAM_OVER = 1.5  # a group above this many times cluster.partition_mib of float32 rows is streamed
SHARDS_PER_TASK = 16  # consecutive shards per scoring task: one read of each group's file per task


def score_group(run: Run, name: str, params, state: dict, offsets: np.ndarray, group: int) -> dict:
    """One cluster-unit metric on one group of clusters in memory; its scores go to the group's file."""
    metric = METRICS[name]
    block = read_group(run, offsets, group)
    out_dir = parts_dir(run, name)
    scores = np.asarray(metric.score(block, state, params), dtype=np.float64) if len(block["pos"]) else np.zeros(0)
    write_group_scores(group_file(out_dir, group), len(run.shards), block.get("shard", np.zeros(0, np.int64)),
                       block.get("row", np.zeros(0, np.int64)), scores)
    mark_done(out_dir, f"g{group:05d}", {"rows": int(len(block["pos"]))}, files=[group_file(out_dir, group)])
    return {"rows": int(len(block["pos"]))}


def score_groups(run: Run, name: str, metric, params, state: dict, offsets: np.ndarray, n_groups: int) -> None:
    """Every group not done yet: in memory as tasks, or, above ``STREAM_OVER`` times the group budget and when
    the metric can, streamed (``metric.stream``) one group at a time from here."""
    out_dir = parts_dir(run, name)
    todo = [g for g in range(n_groups) if not is_done(out_dir, f"g{g:05d}")]
    big = []
    if metric.stream is not None and todo:
        rows = group_rows(run, n_groups)
        limit = int(STREAM_OVER * (run.cfg.cluster.partition_mib << 20)) // (4 * embedding_dim(run))
        big = [g for g in todo if rows[g] > limit]
    with progress(len(todo), f"score {name} (cluster groups)") as bar:
        for _ in run.executor.map_unordered(partial(score_group, run, name, params, state, offsets),
                                            [g for g in todo if g not in big]):
            bar.update(1)
        for g in big:
            mark_done(out_dir, f"g{g:05d}", {"rows": metric.stream(run, params, offsets, g, out_dir), "streamed": True},
                      files=[group_file(out_dir, g)])
            bar.update(1)


def score_shards(run: Run, plan: list[tuple], labels: dict | None, n_groups: int, batch: list[tuple]) -> dict:
    """Every metric's scores for a run of consecutive shards: shard-unit metrics computed shard by shard,
    cluster-unit ones read from one slice of each group's file."""
    s0, sizes = batch[0][0]["index"], [n for _, _, n in batch]
    gathered = {name: gather_scores(parts_dir(run, name), n_groups, len(run.shards), s0, s0 + len(batch), sizes)
                for name, metric, _, _ in plan if metric.unit == "cluster"}
    wants = set().union(*(m.wants(p) for _, m, p, _ in plan if m.unit == "shard"))
    rows = 0
    for item in batch:
        shard = item[0]
        if is_done(run.dir("score"), shard["name"]):
            continue
        block = read_block(run, item, labels=labels, embeddings="embedding" in wants, uid=True,
                           columns=tuple(sorted(wants - {"embedding", "label"})))
        cols = {"uid": block["uid"]}
        if labels is not None:
            cols["label"] = pa.array(block["label"].astype(np.int32))
        for name, metric, params, state in plan:
            scores = (score_block(metric, block, state, params) if metric.unit == "shard"
                      else gathered[name][shard["index"] - s0])
            if len(scores) != len(block["pos"]):
                raise StageError(f"metric {name} returned {len(scores)} scores for {len(block['pos'])} rows of "
                                 f"{shard['name']}")
            cols[f"score_{name}"] = pa.array(scores, pa.float64())
        path = run.layout.shard_file("score", shard["name"])
        write_parquet(path, pa.table(cols))
        mark_done(run.dir("score"), shard["name"], {"rows": len(block["pos"])}, files=[path])
        rows += len(block["pos"])
    return {"rows": rows}


def shard_batches(items: list[tuple], todo: set) -> list[list[tuple]]:
    """Runs of up to ``SHARDS_PER_TASK`` consecutive shards (fewer when there are few shards, so every worker
    gets some), those with a shard still to score."""
    per = max(1, min(SHARDS_PER_TASK, len(items) // 8))
    batches = [items[i:i + per] for i in range(0, len(items), per)]
    return [b for b in batches if any(it[0]["name"] in todo for it in b)]


def run_score(run: Run) -> None:
    metrics = configured(run)
    out_dir = prepare_stage(run, "score")
    if run.info_path("score").exists():
        return
    labels = label_index(run)
    for name, metric, params in metrics:
        if "label" in metric.wants(params) and labels is None:
            raise StageError(f"score.metrics: {name} needs labels, but the input has none")
        if metric.unit == "cluster" and not run.cfg.cluster.partition:
            raise StageError(f"score.metrics: {name} works cluster by cluster and needs cluster.partition=true; "
                             "rerun 'datapruning cluster' with it")
    ctx = context(run, labels)
    items = shard_offsets(run)
    offsets = np.array([offset for _, offset, _ in items], dtype=np.int64)
    n_groups = int(read_json(run.layout.fit_info).get("groups", 0))
    timings = {}
    with timed(run, "score"):
        plan = []
        for name, metric, params in metrics:
            start = time.perf_counter()
            state = prepared(run, ctx, name, metric, params)
            if metric.unit == "cluster":
                score_groups(run, name, metric, params, state, offsets, n_groups)
            plan.append((name, metric, params, state))
            timings[name] = time.perf_counter() - start
        batches = shard_batches(items, {it[0]["name"] for it in items if not is_done(out_dir, it[0]["name"])})
        start = time.perf_counter()
        with progress(len(batches), "score") as bar:
            for _ in run.executor.map_unordered(partial(score_shards, run, plan, labels, n_groups), batches):
                bar.update(1)
        rows = run_rows(run, scores=True)
        infos = {}
        for name, metric, params, state in plan:
            info = metric.summarize(rows, params, state) if metric.summarize else {}
            infos[name] = {**info, "seconds": round(timings[name] + time.perf_counter() - start, 3)}
        write_json(run.info_path("score"), infos)  # written last: the stage's done marker
    shutil.rmtree(run.layout.score_parts, ignore_errors=True)  # every score is in scores/ now
