"""What every stage shares: the run folder layout, config fingerprints, shard lists and progress."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..config import RunConfig, config_from_dict, to_dict
from ..io.files import clean_stage, clean_temp, read_json, write_json

log = logging.getLogger("datapruning")

STAGES = ("embed", "cluster", "score", "select", "manifest")
STAGE_DIRS = {"embed": "embeddings", "cluster": "clusters", "score": "scores", "select": "select", "manifest": "manifest"}
# config sections whose values change each stage's output (cumulative down the pipeline)
STAGE_KEYS = {
    "embed": ("input", "embed"),
    "cluster": ("input", "embed", "cluster", "seed"),
    "score": ("input", "embed", "cluster", "seed", "score"),
    "select": ("input", "embed", "cluster", "seed", "score", "select"),
    "manifest": ("input", "embed", "cluster", "seed", "score", "select"),
}
NOT_RESULT_KEYS = {"embed": ("batch_size", "decode_workers"), "cluster": ("assign_batch",)}


class StageError(RuntimeError):
    """A stage cannot run (missing upstream output, changed input); the message says what to do."""


@dataclass(frozen=True)
class Run:
    """One run folder and its resolved config."""

    cfg: RunConfig
    output: Path

    def dir(self, stage: str) -> Path:
        return self.output / STAGE_DIRS[stage]

    @property
    def shards(self) -> list[dict]:
        path = self.output / "shards.json"
        if not path.exists():
            raise StageError(f"{self.output}: no shards.json; run 'datapruning embed' (or 'run') with --input first")
        return read_json(path)["shards"]


def fingerprint(cfg: RunConfig, stage: str, inputs: list[str]) -> str:
    data = to_dict(cfg)
    for section, drop in NOT_RESULT_KEYS.items():
        for key in drop:
            data[section].pop(key, None)
    picked = {key: data[key] for key in STAGE_KEYS[stage]}
    picked["inputs"] = inputs
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def prepare_stage(run: Run, stage: str) -> Path:
    """Make the stage folder. If it holds outputs of another config, clear it and every later stage."""
    folder = run.dir(stage)
    inputs = [s["path"] for s in run.shards]
    want = fingerprint(run.cfg, stage, inputs)
    marker = folder / "_stage.json"
    if marker.exists() and read_json(marker).get("fingerprint") != want:
        log.warning("%s: config or input changed since the last run; redoing this stage and the ones after it", stage)
        for later in STAGES[STAGES.index(stage):]:
            clean_stage(run.dir(later))
    folder.mkdir(parents=True, exist_ok=True)
    clean_temp(folder)
    clean_temp(run.output)
    if not marker.exists():
        write_json(marker, {"stage": stage, "fingerprint": want})
    return folder


def save_config(run: Run) -> None:
    write_json(run.output / "config.json", to_dict(run.cfg))


def load_run_config(output: Path) -> RunConfig:
    path = Path(output) / "config.json"
    if not path.exists():
        raise StageError(f"{output}: no config.json; give a config or run 'datapruning run' first")
    return config_from_dict(read_json(path))


@contextmanager
def timed(run: Run, stage: str) -> Iterator[dict]:
    """Record a stage's wall time in OUTPUT/timings.json (read into stats.json)."""
    info: dict[str, Any] = {}
    start = time.perf_counter()
    yield info
    path = run.output / "timings.json"
    timings = read_json(path) if path.exists() else {}
    timings[stage] = round(time.perf_counter() - start, 3)
    write_json(path, timings)


def progress(total: int, stage: str):
    """A per-stage progress bar: shards done / total, with samples/s in the postfix."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=stage, unit="shard", disable=None, dynamic_ncols=True)


class Rate:
    """Samples/s for a progress bar postfix."""

    def __init__(self):
        self.start, self.samples = time.perf_counter(), 0

    def add(self, bar, samples: int) -> None:
        self.samples += samples
        bar.update(1)
        bar.set_postfix(samples_per_s=f"{self.samples / max(time.perf_counter() - self.start, 1e-9):.0f}")
