"""The run folder: the only owner of its layout, stage fingerprints, progress and typed stage readers."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import RunConfig, changed_keys, config_from_dict, to_dict
from .io.lock import check_idle, ensure, locked  # noqa: F401 (locked: for callers)
from .errors import RunNotReady, StageError
from .exec import Executor
from .io.files import clean_stage, clean_temp, done_path, meta_dir, read_json, stage_marker, write_json
from .io.tables import block_columns, column_to_matrix, read_stage
from .labels import encode_labels, label_coding
from .rows import BlockRows

log = logging.getLogger("datapruning")

STAGES = ("embed", "cluster", "score", "select", "manifest")
STAGE_DIRS = {"embed": "embeddings", "cluster": "clusters", "score": "scores", "select": "select", "manifest": "manifest",
              "teacher": "teacher"}
# config sections whose values change each stage's output (cumulative down the pipeline)
STAGE_KEYS = {
    "embed": ("input", "embed"),
    "cluster": ("input", "embed", "cluster", "seed"),
    "score": ("input", "embed", "cluster", "seed", "score"),
    "select": ("input", "embed", "cluster", "seed", "score", "select"),
    "manifest": ("input", "embed", "cluster", "seed", "score", "select"),
}
NOT_RESULT_KEYS = {"embed": ("batch_size", "decode_workers"), "cluster": ("assign_batch", "partition_mib"),
                   "input": ("retries", "retry_backoff_s", "allow_failed_shards")}
LABEL_INDEX = "labels.json"  # the run's label coding, in the score stage's meta folder (read by dp4tl via state_dir)
OLD_LAYOUT = ("clusters/centroids.npy", "clusters/fit.json", "teacher/_info.json")  # non-data files of older runs


@dataclass(frozen=True)
class RunLayout:
    """Where every file of a run folder lives: the one place a run path is spelled, config-free.

    A stage's data folder (``embeddings/``, ``clusters/``, ``scores/``, ``select/``, ``manifest/``, ``teacher/``)
    holds only its per-shard parquet files, so any parquet reader takes it as one table. Everything else of
    folder X (done markers, fingerprint, info, the k-means fit, the cluster partitions) is in ``_meta/X/``."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))  # absolute and normalised

    def dir(self, stage: str) -> Path:
        return self.root / STAGE_DIRS[stage]

    def meta(self, stage: str) -> Path:
        return meta_dir(self.dir(stage))

    def shard_file(self, stage: str, shard: str) -> Path:
        return self.dir(stage) / f"{shard}.parquet"

    def info(self, stage: str) -> Path:
        """The stage's summary (written last)."""
        return self.meta(stage) / "info.json"

    def marker(self, stage: str) -> Path:
        """The stage's fingerprint (which config and inputs its outputs belong to)."""
        return stage_marker(self.dir(stage))

    def __getattr__(self, name: str) -> Path:
        if name in FILES:
            where, rel = FILES[name]
            return (self.root if where is None else self.meta(where)) / rel
        raise AttributeError(name)

    def check(self) -> "RunLayout":
        """Refuse a run folder of the older layout (non-data files inside its data folders)."""
        for rel in OLD_LAYOUT:
            if (self.root / rel).exists():
                raise RunNotReady(f"{self.root}: written by an older datapruning ({rel} inside a data folder), "
                                  "which this version does not read; rerun 'datapruning run' with a new --output")
        return self

    def read_shards(self) -> list[dict]:
        """The run's input shards (path, name, format) from shards.json, in order."""
        self.check()
        if not self.shards.exists():
            raise RunNotReady(f"{self.root}: no shards.json; run 'datapruning embed' (or 'run') with --input first")
        return read_json(self.shards)["shards"]


# name -> (stage whose _meta folder holds it, or None for the run folder; relative path)
FILES = {"config": (None, "config.json"), "shards": (None, "shards.json"), "stats": (None, "stats.json"),
         "kept": (None, "kept.parquet"), "timings": (None, "timings.json"), "report": (None, "report.html"),
         "eval": (None, "eval"), "curves": (None, "eval/curves.parquet"), "curves_png": (None, "eval/curves.png"),
         "eval_summary": (None, "eval/summary.json"), "recommended": (None, "eval/recommended.yaml"),
         "centroids": ("cluster", "centroids.npy"), "groups": ("cluster", "groups.npy"),
         "fit_info": ("cluster", "fit.json"), "fit_sample": ("cluster", "fit_sample.f32"),
         "unique": ("cluster", "unique.json"), "parts": ("cluster", "parts"), "ties": ("cluster", "ties"),
         "labels": ("score", LABEL_INDEX), "score_state": ("score", "state"), "score_parts": ("score", "parts"),
         "score_stream": ("score", "stream"),
         "teacher_info": ("teacher", "info.json")}


@dataclass(frozen=True)
class Run:
    """One run folder (its layout), its resolved config and the command's executor (in this process unless
    given)."""

    cfg: RunConfig
    output: Path
    executor: Executor = field(default_factory=Executor, compare=False, repr=False)

    def __reduce__(self):  # a worker gets the run without the command's executor: it works in its own process
        return (Run, (self.cfg, self.output))

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.output)

    def dir(self, stage: str) -> Path:
        return self.layout.dir(stage)

    def info_path(self, stage: str) -> Path:
        return self.layout.info(stage)

    @property
    def shards(self) -> list[dict]:
        return self.layout.read_shards()


def result_config(data: dict) -> dict:
    """A config dict without the keys that do not change any output (batch sizes, workers)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items() if k not in ("workers", "backend", "ray")}
    for section, drop in NOT_RESULT_KEYS.items():
        for key in drop:
            data.get(section, {}).pop(key, None)
    return data


def fingerprint(cfg: RunConfig, stage: str, inputs: list[str]) -> str:
    data = result_config(to_dict(cfg))
    picked = {key: data[key] for key in STAGE_KEYS[stage]}
    picked["inputs"] = inputs
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def prepare_stage(run: Run, stage: str) -> Path:
    """Lock the folder, check the stages read, make the stage folder (cleared with later outputs on a new config)."""
    ensure(run.output)
    folder = run.dir(stage)
    inputs = [s["path"] for s in run.shards]
    check_upstream(run, stage, inputs)
    want = fingerprint(run.cfg, stage, inputs)
    marker = run.layout.marker(stage)
    if marker.exists() and read_json(marker).get("fingerprint") != want:
        log.warning("%s: config or input changed since the last run; redoing this stage and the ones after it", stage)
        clear_outputs(run)
        for later in STAGES[STAGES.index(stage):]:
            clean_stage(run.dir(later))
    folder.mkdir(parents=True, exist_ok=True)
    clean_temp(folder, deep=True)
    clean_temp(run.output)
    save_config(run)
    if not marker.exists():
        write_json(marker, {"stage": stage, "fingerprint": want, "config": to_dict(run.cfg)})
    return folder


def check_upstream(run: Run, stage: str, inputs: list[str]) -> None:
    """Stop when a stage that ``stage`` reads ran with another config (or input) than this run's."""
    for earlier in STAGES[:STAGES.index(stage)]:
        marker = run.layout.marker(earlier)
        stored = read_json(marker) if marker.exists() else {}  # a missing one: the reader names it
        if stored and stored.get("fingerprint") != fingerprint(run.cfg, earlier, inputs):
            changed = changed_keys(stored.get("config"), to_dict(run.cfg), STAGE_KEYS[earlier])
            raise StageError(f"{stage}: the {earlier} stage in {run.output} ran with another config"
                             f"{' (' + ', '.join(changed[:5]) + ')' if changed else ' or input'}; rerun "
                             f"'datapruning {earlier}' with this config first (or 'datapruning run')")


def clear_outputs(run: Run) -> None:
    """Remove the top-level outputs made from an older config (before any stage output changes)."""
    layout = run.layout
    for path in (layout.kept, layout.stats, layout.report):
        path.unlink(missing_ok=True)
    clean_stage(layout.eval)
    run.info_path("manifest").unlink(missing_ok=True)  # it vouches for kept.parquet and stats.json


def save_config(run: Run) -> None:
    """Store the config this run's stages run with (config.json); outputs of another config are cleared first."""
    ensure(run.output)
    path = run.layout.config
    new = to_dict(run.cfg)
    if path.exists() and result_config(read_json(path)) != result_config(new):
        clear_outputs(run)
    write_json(path, new)


def load_run_config(output: Path) -> RunConfig:
    """The run folder's stored config; a reader fails at once while another process writes the folder."""
    check_idle(output)
    path = RunLayout(output).check().config
    if not path.exists():
        raise StageError(f"{output}: no config.json; give a config or run 'datapruning run' first")
    return config_from_dict(read_json(path))


@contextmanager
def timed(run: Run, stage: str) -> Iterator[dict]:
    """Record a stage's wall time in OUTPUT/timings.json (read into stats.json)."""
    info: dict[str, Any] = {}
    start = time.perf_counter()
    yield info
    path = run.layout.timings
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


# ---- readers of the stages' per-shard outputs ----------------------------------------------------------

def shard_rows(run: Run) -> list[tuple[dict, int]]:
    """(shard, row count) for every input shard, from the embed stage's done markers."""
    emb = run.dir("embed")
    out = []
    for shard in run.shards:
        marker = done_path(emb, shard["name"])
        if not marker.exists():
            raise StageError(f"shard {shard['name']} has no embeddings yet; run 'datapruning embed' first")
        out.append((shard, read_json(marker)["rows"]))
    return out


def _check_uids(expected: pa.Array, got: pa.Array, where: str) -> None:
    if not expected.equals(got):
        raise StageError(f"{where}: rows do not match the embeddings by uid; delete that file and rerun")


def load_columns(run: Run, stage: str, shard: str, expected_uids: pa.Array, columns=None) -> pa.Table:
    """One stage's parquet for ``shard``, verified to hold the same uids in the same order as the embeddings."""
    path = run.layout.shard_file(stage, shard)
    if not path.exists():
        raise StageError(f"{stage}: {path} is missing; run 'datapruning {stage}' first")
    table = read_stage(path, columns=None if columns is None else ["uid", *columns])
    _check_uids(expected_uids, table["uid"].combine_chunks(), str(path))
    return table


# ---- numeric blocks for the streaming stages ----------------------------------------------------------

def shard_offsets(run: Run) -> list[tuple[dict, int, int]]:
    """(shard with its ``index``, first global row, rows) for every shard, in shard order."""
    out, offset = [], 0
    for i, (shard, rows) in enumerate(shard_rows(run)):
        out.append(({**shard, "index": i}, offset, rows))
        offset += rows
    return out


def label_index(run: Run) -> dict | None:
    """The run's label coding, built once from every shard's distinct labels and stored in the score stage's meta folder (``RunLayout.labels``):
    ``{"integer": bool, "names": [...], "order": ...}`` (see ``labels.label_coding``). None when the input has no labels."""
    path = run.layout.labels
    if path.exists():
        index = read_json(path)
        return index if index["names"] else None
    seen: set = set()
    for distinct in run.executor.map_unordered(partial(shard_labels, run), [s for s, _ in shard_rows(run)]):
        seen.update(distinct)
    index = label_coding(seen)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, index)
    return index if index["names"] else None


def shard_labels(run: Run, shard: dict) -> list:
    """The distinct labels of one shard's embeddings (a task: the driver only merges these small lists)."""
    emb = run.layout.shard_file("embed", shard["name"])
    if "label" not in pq.read_schema(emb).names:
        return []
    return pc.unique(pq.read_table(emb, columns=["label"])["label"].drop_null()).to_pylist()


def read_block(run: Run, item: tuple, scores: bool = False, labels: dict | None = None,
               embeddings: bool = False, uid: bool = False, columns: tuple = ()) -> dict:
    """One shard's numeric columns: pos, shard, cluster, cos_dist, tie (cluster stage); with ``scores`` the
    score stage's label codes and score_<metric> columns; with a ``labels`` index the label codes from the
    embeddings; ``embeddings``: the float32 [n, d] matrix; ``uid``: the Arrow uid array; ``columns``: more
    columns of the embeddings table (``io.tables.block_columns``: text, clip_score, original_width, ...).
    ``item`` is (shard, offset, rows) from ``shard_offsets``."""
    shard, offset, _ = item
    name = shard["name"]
    need_uid = uid or labels is not None or embeddings or bool(columns)  # strings only when asked for or checked
    layout = run.layout
    cl = read_stage(layout.shard_file("cluster", name),
                    columns=["uid", "cluster", "cos_dist", "tie"] if need_uid else ["cluster", "cos_dist", "tie"])
    n = cl.num_rows
    block = {"pos": np.arange(offset, offset + n, dtype=np.int64), "shard": np.full(n, shard["index"], np.int32),
             "cluster": cl["cluster"].to_numpy().astype(np.int64),
             "cos_dist": cl["cos_dist"].to_numpy().astype(np.float64), "tie": cl["tie"].to_numpy()}
    if uid:
        block["uid"] = cl["uid"].combine_chunks()
    if labels is not None or embeddings or columns:
        path = layout.shard_file("embed", name)
        have = pq.read_schema(path).names
        cols = [c for c in ("uid", "label", "embedding") if c in have
                and (c != "embedding" or embeddings) and (c != "label" or labels is not None)]
        emb = read_stage(path, columns=cols + [c for c in columns if c in have and c not in cols])
        block.update(block_columns(emb, columns, str(path)))
        _check_uids(cl["uid"].combine_chunks(), emb["uid"].combine_chunks(), str(path))
        if labels is not None:
            block["label"] = (encode_labels(emb["label"], labels) if "label" in emb.column_names
                              else np.full(n, -1, np.int64))
        if embeddings:
            block["embedding"] = column_to_matrix(emb["embedding"], f"embeddings/{name}.parquet")
    if scores:  # the label codes and scores, not the uids (most of the file's bytes)
        path = layout.shard_file("score", name)
        names = pq.ParquetFile(path).schema_arrow.names
        sc = read_stage(path, columns=[c for c in names if c == "label" or c.startswith("score_")])
        if sc.num_rows != n:
            raise StageError(f"scores/{name}.parquet has {sc.num_rows} rows, clusters/{name}.parquet "
                             f"{n}; delete it and rerun 'datapruning score'")
        for col in sc.column_names:
            if col == "label" or col.startswith("score_"):
                block[col] = sc[col].to_numpy().astype(np.int64 if col == "label" else np.float64)
    return block


def run_rows(run: Run, **columns):
    """Every row of the run as blocks, one per shard (see ``rows.BlockRows``), on the run's executor;
    ``columns`` are ``read_block``'s options."""
    items = shard_offsets(run)
    return BlockRows(partial(read_block, run, **columns), items, sum(n for _, _, n in items), run.executor)
