"""Select stage: scores -> keep flags via a registered selector, optionally after a SemDeDup filter."""
from __future__ import annotations

import inspect

import numpy as np
import pyarrow as pa

from ..io.files import is_done, mark_done, write_json, write_parquet
from ..metrics.ranking import keep_count
from . import SELECTORS, SelectInputs
from ..run import Run, StageError, prepare_stage, progress, timed
from ..run import load_run_arrays, load_scores

COMMON = ("metric", "mode", "min_per_cluster", "min_per_label")


def dedup_filter(cfg, scores: dict) -> tuple[np.ndarray | None, dict]:
    """Rows left after SemDeDup at ``select.dedup_eps`` (or the eps reaching ``dedup_keep_fraction``)."""
    if cfg.dedup_eps is None and cfg.dedup_keep_fraction is None:
        return None, {}
    if "semdedup" not in scores:
        raise StageError("select.dedup_eps / dedup_keep_fraction need the semdedup metric in score.metrics")
    from ..metrics.semdedup import semdedup_filter

    return semdedup_filter(scores["semdedup"], eps=cfg.dedup_eps, keep_fraction=cfg.dedup_keep_fraction)


def compute_keep(run: Run) -> tuple[dict, np.ndarray, dict]:
    scfg = run.cfg.select
    if scfg.method not in SELECTORS:
        raise StageError(f"select.method: unknown selector {scfg.method!r}; known: {sorted(SELECTORS)}")
    arrays = load_run_arrays(run, with_embeddings=False)
    scores = load_scores(run, arrays)
    eligible, dedup_info = dedup_filter(scfg, scores)
    n_total = len(arrays["uid"])
    n_keep = keep_count(n_total, None if scfg.keep_count is not None else scfg.keep_fraction, scfg.keep_count)
    if eligible is not None:
        n_keep = min(n_keep, int(eligible.sum()))
    centroids = np.load(run.dir("cluster") / "centroids.npy", allow_pickle=False)
    inp = SelectInputs(uid=arrays["uid"], cluster=arrays["cluster"], cos_dist=arrays["cos_dist"],
                       centroids=centroids, scores=scores, labels=arrays["labels"], eligible=eligible,
                       seed=run.cfg.seed)
    fn = SELECTORS[scfg.method]
    accepted = inspect.signature(fn).parameters
    params = {k: getattr(scfg, k) for k in COMMON if k in accepted}
    params.update(scfg.params)
    try:
        keep, info = fn(inp, n_keep, **params)
    except TypeError as exc:
        raise StageError(f"select.params for {scfg.method}: {exc}") from None
    keep = np.asarray(keep, dtype=bool)
    if eligible is not None and (keep & ~eligible).any():
        raise StageError(f"selector {scfg.method} kept rows that the dedup filter removed")
    info = {"method": scfg.method, "n_total": n_total, "n_keep_target": n_keep, "kept": int(keep.sum()),
            **({"dedup": dedup_info} if dedup_info else {}), **info}
    return arrays, keep, info


def run_select(run: Run) -> None:
    out_dir = prepare_stage(run, "select")
    todo = [s["name"] for s in run.shards if not is_done(out_dir, s["name"])]
    if not todo:
        return
    with timed(run, "select"):
        arrays, keep, info = compute_keep(run)
        write_json(out_dir / "_info.json", info)
        with progress(len(todo), "select") as bar:
            for name, lo, hi in arrays["bounds"]:
                if name in todo:
                    write_parquet(out_dir / f"{name}.parquet", pa.table(
                        {"uid": pa.array(arrays["uid"][lo:hi], pa.string()), "keep": pa.array(keep[lo:hi])}))
                    mark_done(out_dir, name, {"rows": hi - lo, "kept": int(keep[lo:hi].sum())})
                    bar.update(1)
