"""Score stage: run every configured metric over the whole run, write scores/{shard}.parquet."""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from ..io.files import is_done, mark_done, write_json, write_parquet
from . import METRICS, ScoreInputs
from ..run import Run, StageError, log, prepare_stage, progress, timed
from ..run import load_run_arrays


def compute_scores(run: Run) -> tuple[dict, dict, dict]:
    """All metrics on the loaded run: (arrays, {metric: scores}, {metric: info})."""
    unknown = [m for m in run.cfg.score.metrics if m not in METRICS]
    if unknown:
        raise StageError(f"score.metrics: unknown metric {unknown[0]!r}; known: {sorted(METRICS)}")
    arrays = load_run_arrays(run, with_embeddings=True)
    centroids = np.load(run.dir("cluster") / "centroids.npy", allow_pickle=False)
    inp = ScoreInputs(uid=arrays["uid"], embeddings=arrays["embeddings"], cluster=arrays["cluster"],
                      cos_dist=arrays["cos_dist"], centroids=centroids, labels=arrays["labels"],
                      label_names=arrays["label_names"], seed=run.cfg.seed)
    scores, infos = {}, {}
    for name in run.cfg.score.metrics:
        params = dict(run.cfg.score.params.get(name, {}))
        start = time.perf_counter()
        fn = METRICS[name]
        try:
            out = fn(inp, **params)
        except TypeError as exc:
            raise StageError(f"score.params.{name}: {exc}") from None
        if len(out.scores) != len(inp.uid):
            raise StageError(f"metric {name} returned {len(out.scores)} scores for {len(inp.uid)} samples")
        scores[name] = np.asarray(out.scores, dtype=np.float64)
        infos[name] = {**out.info, "seconds": round(time.perf_counter() - start, 3)}
        log.info("score: %s done in %.1fs", name, infos[name]["seconds"])
    return arrays, scores, infos


def run_score(run: Run) -> None:
    out_dir = prepare_stage(run, "score")
    names = [s["name"] for s in run.shards]
    todo = [n for n in names if not is_done(out_dir, n)]
    if not todo:
        return
    with timed(run, "score"):
        arrays, scores, infos = compute_scores(run)
        write_json(out_dir / "_info.json", infos)  # before the markers: a finished stage always has it
        with progress(len(todo), "score") as bar:
            for name, lo, hi in arrays["bounds"]:
                if name not in todo:
                    continue
                cols = {"uid": pa.array(arrays["uid"][lo:hi], pa.string())}
                cols.update({f"score_{m}": pa.array(s[lo:hi], pa.float64()) for m, s in scores.items()})
                write_parquet(out_dir / f"{name}.parquet", pa.table(cols))
                mark_done(out_dir, name, {"rows": hi - lo})
                bar.update(1)
