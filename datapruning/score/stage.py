"""Score stage: every configured metric in resumable units (cluster groups, then shards) on the executor.

Writes scores/<shard>.parquet (uid, label code, score_<metric>...) and the stage's info file (last).
"""
from __future__ import annotations

import time
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import StageError
from ..io.files import atomic_path, is_done, mark_done, read_json, write_json, write_parquet
from ..cluster.parts import read_group
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


def score_group(run: Run, name: str, params, state: dict, offsets: np.ndarray, group: int) -> dict:
    """One cluster-unit metric on one group of clusters; its scores go back per shard (parts/<metric>/<shard>/)."""
    metric = METRICS[name]
    block = read_group(run, offsets, group)
    out_dir, files = parts_dir(run, name), []
    if len(block["pos"]):
        scores = np.asarray(metric.score(block, state, params), dtype=np.float64)
        shard = block["shard"]
        order = np.argsort(shard, kind="stable")
        bounds = np.flatnonzero(np.diff(shard[order])) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
            rows = order[lo:hi]
            files.append(out_dir / f"{int(shard[rows[0]]):06d}" / f"g{group:05d}.parquet")
            write_parquet(files[-1], pa.table({"row": pa.array(block["row"][rows].astype(np.int32)),
                                               "score": pa.array(scores[rows])}))
    mark_done(out_dir, f"g{group:05d}", {"rows": int(len(block["pos"]))}, files=files)
    return {"rows": int(len(block["pos"]))}


def gather_parts(run: Run, name: str, shard_index: int, n: int) -> np.ndarray:
    """A cluster-unit metric's scores for one shard, from the group outputs (NaN where no group wrote)."""
    out = np.full(n, np.nan)
    folder = parts_dir(run, name) / f"{shard_index:06d}"
    for path in sorted(folder.glob("g*.parquet")):
        part = pq.read_table(path)
        out[part["row"].to_numpy()] = part["score"].to_numpy()
    return out


def score_shard(run: Run, plan: list[tuple], labels: dict | None, item: tuple) -> dict:
    """Every metric's scores for one shard: shard-unit metrics computed here, cluster-unit ones gathered."""
    shard = item[0]
    wants = set().union(*(m.wants(p) for _, m, p, _ in plan if m.unit == "shard"))
    block = read_block(run, item, labels=labels, embeddings="embedding" in wants, uid=True,
                       columns=tuple(sorted(wants - {"embedding", "label"})))
    cols = {"uid": block["uid"]}
    if labels is not None:
        cols["label"] = pa.array(block["label"].astype(np.int32))
    for name, metric, params, state in plan:
        if metric.unit == "shard":
            scores = score_block(metric, block, state, params)
        else:
            scores = gather_parts(run, name, shard["index"], len(block["pos"]))
        if len(scores) != len(block["pos"]):
            raise StageError(f"metric {name} returned {len(scores)} scores for {len(block['pos'])} rows of {shard['name']}")
        cols[f"score_{name}"] = pa.array(scores, pa.float64())
    path = run.layout.shard_file("score", shard["name"])
    write_parquet(path, pa.table(cols))
    mark_done(run.dir("score"), shard["name"], {"rows": len(block["pos"])}, files=[path])
    return {"rows": len(block["pos"])}


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
                todo = [g for g in range(n_groups) if not is_done(parts_dir(run, name), f"g{g:05d}")]
                with progress(len(todo), f"score {name} (cluster groups)") as bar:
                    for _ in run.executor.map_unordered(partial(score_group, run, name, params, state, offsets), todo):
                        bar.update(1)
            plan.append((name, metric, params, state))
            timings[name] = time.perf_counter() - start
        todo = [it for it in items if not is_done(out_dir, it[0]["name"])]
        start = time.perf_counter()
        with progress(len(todo), "score") as bar:
            for _ in run.executor.map_unordered(partial(score_shard, run, plan, labels), todo):
                bar.update(1)
        rows = run_rows(run, scores=True)
        infos = {}
        for name, metric, params, state in plan:
            info = metric.summarize(rows, params, state) if metric.summarize else {}
            infos[name] = {**info, "seconds": round(timings[name] + time.perf_counter() - start, 3)}
        write_json(run.info_path("score"), infos)  # written last: the stage's done marker
