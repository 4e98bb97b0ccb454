"""Run stages in order over one run folder; every stage resumes from its done markers."""
from __future__ import annotations

import logging
from pathlib import Path

from .config import RunConfig
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
    from .select.filters import parse_filters
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
    parse_filters(cfg.select.filters, cfg.score.metrics)
    if "clip_score" in cfg.score.metrics and cfg.embed.modality != "pair":
        raise ConfigError("score.metrics: clip_score compares a sample's image and caption embeddings; set "
                          "embed.modality=pair")


def run_stage(stage: str, cfg: RunConfig, output: str | Path, input_spec=None):
    """Run one stage (``embed`` takes ``input_spec``; the others read the run folder)."""
    check_config(cfg)
    run = Run(cfg, Path(output))
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
