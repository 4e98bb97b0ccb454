"""Select stage: scores -> keep flags via a registered selector, after an optional SemDeDup filter.

The decision comes from a few passes over the run's numeric columns; the flags are written shard by shard
(select/<shard>.parquet).
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa

from ..errors import ConfigError, StageError
from ..params import show
from ..io.files import is_done, mark_done, write_json, write_parquet
from ..metrics.ranking import keep_count
from ..run import Run, prepare_stage, progress, run_rows, timed
from ..metrics.semdedup import dedup_step
from ..score import METRICS
from ..score.stage import stored_state
from . import SELECTORS
from .filters import with_filters

COMMON = ("metric", "mode", "min_per_cluster", "min_per_label")


def selector_params(cfg) -> tuple:
    """(Selector, typed params) for ``select.method``; unknown or meaningless keys fail here."""
    scfg = cfg.select
    if scfg.method not in SELECTORS:
        raise ConfigError(f"config key 'select.method': unknown selector {show(scfg.method)}; known: {sorted(SELECTORS)}")
    selector = SELECTORS[scfg.method]
    return selector, selector.parse(dict(scfg.params), {k: getattr(scfg, k) for k in COMMON})


def _has_semdedup(block: dict) -> bool:
    return "score_semdedup" in block


def dedup_filter(rows, cfg) -> tuple:
    """The eligibility step for ``select.dedup_eps`` / ``dedup_keep_fraction`` (None without one) and its info."""
    if cfg.dedup_eps is None and cfg.dedup_keep_fraction is None:
        return None, {}
    if rows.n and not rows.reduce(_has_semdedup, all):
        raise StageError("select.dedup_eps / dedup_keep_fraction need the semdedup metric in score.metrics")
    return dedup_step(rows, cfg.dedup_eps, cfg.dedup_keep_fraction)


def write_keep(run: Run, rule, names: list[str], block: dict) -> dict:
    """One shard's keep flags (select/<shard>.parquet: uid, keep) and its done marker."""
    name = names[int(block["shard"][0])] if len(block["shard"]) else None
    keep = np.asarray(rule(block), dtype=bool)
    if "eligible" in block and (keep & ~block["eligible"]).any():
        raise StageError(f"selector {run.cfg.select.method} kept rows that the dedup filter removed")
    if name is not None:
        path = run.layout.shard_file("select", name)
        write_parquet(path, pa.table({"uid": block["uid"], "keep": pa.array(keep)}))
        mark_done(run.dir("select"), name, {"rows": len(keep), "kept": int(keep.sum())}, files=[path])
    return {"rows": len(keep), "kept": int(keep.sum())}


def known_values(run: Run) -> dict:
    """What the score stage already computed that a selector may reuse: DBP's ``d_inter`` (k² x d work) by its
    ``l`` (``{"d_inter": {l: array}}``; empty without the dbp metric)."""
    state = stored_state(run, "dbp")
    if state is None or "d_inter" not in state:
        return {}
    l = METRICS["dbp"].parse(run.cfg.score.params.get("dbp"), run.cfg.seed).l
    return {"d_inter": {l: state["d_inter"]}}


def run_select(run: Run) -> None:
    selector, params = selector_params(run.cfg)
    out_dir = prepare_stage(run, "select")
    if run.info_path("select").exists():
        return
    scfg = run.cfg.select
    with timed(run, "select"):
        rows = run_rows(run, scores=True)
        step, dedup_info = dedup_filter(rows, scfg)
        step, filter_info = with_filters(rows, scfg, run.cfg.score.metrics, step)  # select.filters
        if step is not None:
            rows = rows.with_columns(step)
        n_total = rows.n
        n_keep = keep_count(n_total, None if scfg.keep_count is not None else scfg.keep_fraction, scfg.keep_count)
        if step is not None:
            n_keep = min(n_keep, filter_info.get("kept", dedup_info.get("kept")))
        centroids = np.load(run.layout.centroids, allow_pickle=False)
        rule, info = selector.decide(rows, n_keep, params, centroids, known_values(run))
        names = [s["name"] for s in run.shards]
        writer = run_rows(run, scores=True, uid=True)
        if step is not None:
            writer = writer.with_columns(step)
        with progress(len(names), "select") as bar:
            kept = 0
            for shard_info in writer.map(partial(write_keep, run, rule, names)):
                kept += shard_info["kept"]
                bar.update(1)
        for name in names:  # a shard with no rows has no shard index in its block: write its empty file here
            if not is_done(out_dir, name):
                path = run.layout.shard_file("select", name)
                write_parquet(path, pa.table({"uid": pa.array([], pa.string()), "keep": pa.array([], pa.bool_())}))
                mark_done(out_dir, name, {"rows": 0, "kept": 0}, files=[path])
        info = {"method": scfg.method, "n_total": n_total, "n_keep_target": n_keep, "kept": kept,
                **({"dedup": dedup_info} if dedup_info else {}), **({"filters": filter_info} if filter_info else {}),
                **info}
        write_json(run.info_path("select"), info)  # written last: the stage's done marker
