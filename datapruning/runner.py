"""Run stages in order over one run folder; every stage resumes from its done markers."""
from __future__ import annotations

import logging
from pathlib import Path

from .config import RunConfig
from .cluster.stage import run_cluster
from .embed.stage import run_embed
from .manifest.stage import run_manifest
from .run import STAGES, Run, locked
from .score.stage import run_score
from .select.stage import run_select

log = logging.getLogger("datapruning")


def run_stage(stage: str, cfg: RunConfig, output: str | Path, input_spec=None):
    """Run one stage (``embed`` takes ``input_spec``; the others read the run folder)."""
    run = Run(cfg, Path(output))
    if input_spec is not None and stage != "embed":
        raise ValueError(f"{stage}: --input is only read by the embed stage")
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
