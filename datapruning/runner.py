"""Run stages in order over one run folder; every stage resumes from its done markers."""
from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from .config import RunConfig, absolute_paths, config_from_dict, to_dict
from .errors import ConfigError
from .params import show
from .cluster.stage import run_cluster
from .embed.stage import discover, run_embed
from .exec import Executor, open_executor
from .health import assess, before_stage, plan, settle
from .manifest.stage import run_manifest
from .io.files import clean_temp, read_json
from .run import STAGES, Run, locked, save_config
from .score.stage import run_score
from .select.stage import run_select

log = logging.getLogger("datapruning")


def check_config(cfg: RunConfig, stages=STAGES) -> None:
    """Every metric's and the selector's typed parameters, and the rules across them for ``stages``, checked before
    any stage runs or anything is written: an unknown or meaningless key fails here with the key named."""
    from .score import METRICS
    from .select.filters import parse_filters
    from .select.stage import selector_params

    metrics = list(cfg.score.metrics)
    if not metrics:
        raise ConfigError("config key 'score.metrics': give at least one metric; known: " + str(sorted(METRICS)))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"config key 'score.metrics': unknown metric {show(unknown[0])}; known: {sorted(METRICS)}")
    if len(set(metrics)) < len(metrics):
        raise ConfigError(f"config key 'score.metrics': a metric is named twice in {show(metrics)}")
    extra = sorted(set(cfg.score.params) - set(metrics))
    if extra:
        raise ConfigError(f"config key 'score.params.{show(extra[0])[1:-1]}': {show(extra[0])} is not in score.metrics "
                          f"{show(metrics)}")
    for name in metrics:
        METRICS[name].parse(cfg.score.params.get(name), cfg.seed)
    _, params = selector_params(cfg)
    metric = getattr(params, "metric", None)
    if "select" in stages and metric is not None and metric not in metrics:
        key = "select.metric" if cfg.select.metric is not None or "metric" not in cfg.select.params else \
            "select.params.metric"
        raise ConfigError(f"config key {key!r}: select.method={cfg.select.method} ranks by {show(metric)}, which is "
                          f"not in score.metrics {show(metrics)}; add it there or set {key} to one of them")
    if (cfg.select.dedup_eps is not None or cfg.select.dedup_keep_fraction is not None) and "semdedup" not in metrics:
        raise ConfigError("config key 'select.dedup_eps' / 'select.dedup_keep_fraction': the SemDeDup filter needs "
                          "semdedup in score.metrics")
    parse_filters(cfg.select.filters, cfg.score.metrics)
    if "clip_score" in metrics and cfg.embed.modality != "pair":
        raise ConfigError("config key 'score.metrics': clip_score compares a sample's image and caption embeddings; "
                          "set embed.modality=pair")


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with every local file it names, the metrics' parameters included, absolute and normalised: what
    config.json records, so the run (and recommended.yaml) work from any directory."""
    from .score import METRICS

    data = absolute_paths(to_dict(cfg), RunConfig)
    data["score"]["params"] = {name: absolute_paths(raw, METRICS[name].params) if name in METRICS else raw
                               for name, raw in data["score"]["params"].items()}
    return config_from_dict(data)


def run_stage(stage: str, cfg: RunConfig, output: str | Path, input_spec=None, executor: Executor | None = None):
    """Run one stage (``embed`` takes ``input_spec``; the others read the run folder) on ``executor``, or on one
    opened for this stage. Units whose files were lost since they were done are redone first
    (``health.before_stage``), and compared afterwards."""
    check_config(cfg, (stage,))
    if input_spec is not None and stage != "embed":
        raise ConfigError(f"{stage}: --input is only read by the embed stage")
    with ExitStack() as stack:
        ex = executor or stack.enter_context(open_executor(cfg))
        run = Run(with_absolute_paths(cfg), Path(output), ex)
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
    """embed -> cluster -> score -> select -> manifest on one executor; returns stats.json's content. A stage
    runs when it is not done, or a stage that runs reads files of it that were lost; one that is done, or whose
    lost files nothing still reads, is left as it is (``health.plan``)."""
    check_config(cfg, stages)  # before the lock: a wrong setting writes nothing
    run = Run(with_absolute_paths(cfg), Path(output))
    layout = run.layout
    with locked(run.output), open_executor(cfg) as ex:  # one writer across the stages; one pool for all
        if input_spec is not None:
            discover(run, input_spec)
        for stage in stages:
            states = assess(run) if layout.shards.exists() else None
            todo = plan(run, stages, states)
            if stage in todo:
                log.info("stage %s", stage)
                log.debug("%s: %s", stage, todo[stage])
                run_stage(stage, cfg, output, executor=ex)
            elif states[stage].state == "done":
                log.info("skipping stage %s: done", stage)
            else:
                log.info("skipping stage %s: %s (%s), but no later stage still reads it", stage,
                         states[stage].state, states[stage].detail)
        for stage in stages:  # a kill leaves temporary files in sub-folders too, even of stages done since
            clean_temp(run.dir(stage), deep=True)
        save_config(run)  # also when every stage was done: the keys that change no output (workers, ...)
        return read_json(layout.stats) if layout.stats.exists() else {}
