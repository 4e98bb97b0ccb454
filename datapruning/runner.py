"""Run stages in order over one run folder; every stage resumes from its done markers."""
from __future__ import annotations

import logging
from pathlib import Path

from .config import RunConfig, absolute_paths, config_from_dict, to_dict
from .errors import ConfigError
from .cluster.stage import run_cluster
from .embed.stage import run_embed
from .manifest.stage import run_manifest
from .run import STAGES, Run, locked
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
    selector_params(cfg)


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with every local file it names, the metrics' parameters included, absolute and normalised: what
    config.json records, so the run (and recommended.yaml) work from any directory."""
    from .score import METRICS

    data = absolute_paths(to_dict(cfg), RunConfig)
    data["score"]["params"] = {name: absolute_paths(raw, METRICS[name].params) if name in METRICS else raw
                               for name, raw in data["score"]["params"].items()}
    return config_from_dict(data)


def run_stage(stage: str, cfg: RunConfig, output: str | Path, input_spec=None):
    """Run one stage (``embed`` takes ``input_spec``; the others read the run folder)."""
    check_config(cfg)
    run = Run(with_absolute_paths(cfg), Path(output))
    if input_spec is not None and stage != "embed":
        raise ConfigError(f"{stage}: --input is only read by the embed stage")
    with locked(run.output):  # one writer per run folder; released when the stage ends
        if stage == "embed":
            return run_embed(run, input_spec)
        return {"cluster": run_cluster, "score": run_score, "select": run_select, "manifest": run_manifest}[stage](run)


def run_pipeline(cfg: RunConfig, input_spec, output: str | Path, stages=STAGES) -> dict:
    """embed -> cluster -> score -> select -> manifest; returns stats.json's content."""
    stats = None
    with locked(Path(output)):  # held across the stages, so no other writer slips in between
        for stage in stages:
            log.info("stage %s", stage)
            stats = run_stage(stage, cfg, output, input_spec if stage == "embed" else None)
    return stats
