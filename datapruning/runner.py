"""Run stages in order over one run folder; every stage resumes from its done markers."""
from __future__ import annotations

import logging
from pathlib import Path

from .config import RunConfig, show
from .errors import ConfigError
from .cluster.stage import run_cluster
from .embed.stage import discover, run_embed
from .health import assess, before_stage, plan, settle
from .manifest.stage import run_manifest
from .io.files import clean_temp, read_json
from .run import STAGES, Run, locked, save_config
from .score.stage import run_score
from .select.stage import run_select

log = logging.getLogger("datapruning")


def check_config(cfg: RunConfig) -> None:
    """Every metric's and the selector's typed parameters, checked before any stage runs: an unknown or
    meaningless key fails here with the key and the accepted values named."""
    from .score import METRICS
    from .select.stage import selector_params

    unknown = [m for m in cfg.score.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"score.metrics: unknown metric {unknown[0]!r}; known: {sorted(METRICS)}")
    extra = sorted(set(cfg.score.params) - set(cfg.score.metrics))
    if extra:
        raise ConfigError(f"score.params.{extra[0]}: {extra[0]!r} is not in score.metrics {list(cfg.score.metrics)}")
    for name in cfg.score.metrics:
        METRICS[name].parse(cfg.score.params.get(name), cfg.seed)
    selector, params = selector_params(cfg)
    metric = getattr(params, "metric", None)
    if metric is not None and metric not in cfg.score.metrics:  # else found out only after three stages ran
        given = "" if cfg.select.metric is not None or "metric" in cfg.select.params else \
            f" (the default of select.method={selector.name})"
        raise ConfigError(f"select.metric: {show(metric)}{given} is not in score.metrics {list(cfg.score.metrics)}; "
                          "add it there, or select by one of those")
    if (cfg.select.dedup_eps is not None or cfg.select.dedup_keep_fraction is not None) and \
            "semdedup" not in cfg.score.metrics:
        raise ConfigError("select.dedup_eps / select.dedup_keep_fraction need the semdedup metric in score.metrics")


def run_stage(stage: str, cfg: RunConfig, output: str | Path, input_spec=None):
    """Run one stage (``embed`` takes ``input_spec``; the others read the run folder). Units whose files were
    lost since they were done are redone first (``health.before_stage``), and compared afterwards."""
    check_config(cfg)
    run = Run(cfg, Path(output))
    if input_spec is not None and stage != "embed":
        raise ConfigError(f"{stage}: --input is only read by the embed stage")
    with locked(run.output):  # one writer per run folder; released when the stage ends
        if input_spec is not None:
            discover(run, input_spec)
        before_stage(run, stage)
        result = {"embed": run_embed, "cluster": run_cluster, "score": run_score, "select": run_select,
                  "manifest": run_manifest}[stage](run)
        settle(run, stage)
        clean_temp(run.dir(stage), deep=True)  # left by workers killed mid-unit (their units ran again)
        return result


def run_pipeline(cfg: RunConfig, input_spec, output: str | Path, stages=STAGES) -> dict:
    """embed -> cluster -> score -> select -> manifest; returns stats.json's content. A stage runs when it is
    not done, or a stage that runs reads files of it that were lost; one that is done, or whose lost files
    nothing still reads, is left as it is (``health.plan``)."""
    check_config(cfg)
    run = Run(cfg, Path(output))
    with locked(run.output):  # held across the stages, so no other writer slips in between
        if input_spec is not None:
            discover(run, input_spec)
        for stage in stages:
            states = assess(run) if (run.output / "shards.json").exists() else None
            todo = plan(run, stages, states)
            if stage in todo:
                log.info("stage %s", stage)
                log.debug("%s: %s", stage, todo[stage])
                run_stage(stage, cfg, output)
            elif states[stage].state == "done":
                log.info("skipping stage %s: done", stage)
            else:
                log.info("skipping stage %s: %s (%s), but no later stage still reads it", stage,
                         states[stage].state, states[stage].detail)
        for stage in stages:  # a kill leaves temporary files in sub-folders too, even of stages done since
            clean_temp(run.dir(stage), deep=True)
        save_config(run)  # also when every stage was done: the keys that change no output (workers, ...)
        stats_path = run.output / "stats.json"
        return read_json(stats_path) if stats_path.exists() else {}
