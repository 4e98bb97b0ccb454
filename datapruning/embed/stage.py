"""Embed stage: input shards -> embeddings/{shard}.parquet (uid, shard, key, label, split, text, embedding)."""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .encoders import Encoder, build_encoder, decode_input
from .samples import ROW_NAMES, caption, embedding_table, source_uid, text_field, write_shard
from ..errors import InputError, StageError, UnreadableFile
from ..io.files import (check_any_rows, clean_stage, done_path, is_done, mark_done, read_json, write_json,
                        write_parquet)
from ..io.shards import check_output, detect_format, expand_input, input_identity, shard_names
from ..io.tables import label_strings, label_text, normalise_rows, precomputed_table
from ..io.webdataset import ShardUnavailable, iter_tar_samples, retrying, skip, with_retries
from ..exec import map_unordered, map_with_setup
from ..run import STAGES, Rate, Run, clear_outputs, log, prepare_stage, progress, save_config, timed

TABLE_FORMATS = ("parquet", "clip_retrieval", "npy", "datacomp")


def discover(run: Run, input_spec) -> list[dict]:
    """Resolve the input into shards.json (path, name, format); a rerun must name the same input."""
    paths = expand_input(input_spec)
    check_output(run.output, input_spec, paths)
    fmt = detect_format(paths, run.cfg.input.format)
    shards = [{"path": p, "name": n, "format": fmt} for p, n in zip(paths, shard_names(paths))]
    run.output.mkdir(parents=True, exist_ok=True)
    write_json(run.output / "shards.json", {"shards": shards})
    return shards


SORT_WINDOW_BATCHES = 64  # length-sorted encoders: sort up to this many batches at once (a usual shard whole)


def encode_sorted(encoder: Encoder, items: list, batch_size: int) -> np.ndarray:
    """Embed ``items`` in batches of similar ``encoder.length`` (longest first, as sentence-transformers does),
    less padding than file order; the rows come back in the order of ``items``."""
    order = np.argsort([-encoder.length(x) for x in items], kind="stable")
    parts = [encoder.forward([items[i] for i in order[s:s + batch_size]]) for s in range(0, len(items), batch_size)]
    out = np.empty((len(items), parts[0].shape[1]), np.float32)
    out[order] = np.concatenate(parts)
    return out


_ENCODER_CACHE: dict[str, Encoder] = {}


def get_encoder(cfg) -> Encoder:
    """Build the encoder once per worker process (never pickled from the driver)."""
    key = repr(cfg.embed)
    if key not in _ENCODER_CACHE:
        _ENCODER_CACHE[key] = build_encoder(cfg.embed)
    return _ENCODER_CACHE[key]


def embed_tar_shard(cfg, path: str, shard: str, out_dir: Path, encoder: Encoder, source: dict | None = None) -> dict:
    """Read one webdataset tar, embed its samples in batches (text: length-sorted within a window of the shard,
    rows back in file order), write parquet + done marker."""
    from .gpu_decode import embed_tar_shard_tensors, tensor_decode_spec

    spec = tensor_decode_spec(cfg, encoder)  # embed.image_decode: JPEG decode + resize as tensors (CUDA)
    if spec is not None:
        return embed_tar_shard_tensors(cfg, path, shard, out_dir, encoder, spec, source)
    icfg, ecfg, skipped = cfg.input, cfg.embed, Counter()
    rows = {name: [] for name in ROW_NAMES}
    chunks: list[np.ndarray] = []
    batch_items, batch_meta, pending = [], [], []  # pending: prepared inputs not yet embedded, in file order
    window = ecfg.batch_size * SORT_WINDOW_BATCHES if encoder.length else 0
    pool = ThreadPoolExecutor(max(1, ecfg.decode_workers))

    def prepare(sample):
        try:
            item = decode_input(sample, ecfg.modality, icfg.image_keys, icfg.text_keys)
            return encoder.prepare(item), None
        except ValueError as exc:
            return None, str(exc)

    def encode():
        if pending:
            chunks.append(encode_sorted(encoder, pending, ecfg.batch_size) if window else encoder.forward(pending))
            pending.clear()

    def flush():
        prepared = list(pool.map(prepare, batch_items))
        for (sample_meta, (item, err)) in zip(batch_meta, prepared):
            if err is not None:
                skip(skipped, err, shard, sample_meta[2], err.replace("_", " "), cfg.strict)
                continue
            pending.append(item)
            for name, value in zip(ROW_NAMES, sample_meta):
                rows[name].append(value)
        if len(pending) >= window:
            encode()
        batch_items.clear()
        batch_meta.clear()

    try:
        for sample in iter_tar_samples(path, shard, skipped, cfg.strict):
            key = sample["__key__"]  # unique: the reader counts and drops repeated keys
            label = label_text(text_field(sample.get(icfg.label_key)))
            text = caption(sample, icfg.text_keys) if ecfg.modality == "image" else None
            batch_items.append(sample)
            batch_meta.append((f"{shard}/{key}", shard, key, label, text, source_uid(sample)))
            if len(batch_items) >= ecfg.batch_size:
                flush()
        if batch_items:
            flush()
        encode()
    finally:
        pool.shutdown()
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
    if not any(v is not None for v in rows["text"]):
        rows.pop("text")
    return write_shard(cfg, out_dir, shard, rows, matrix, skipped, encoder.name, source=source)


def embed_table_shard(cfg, path: str, shard: str, fmt: str, out_dir: Path, source: dict | None = None) -> dict:
    """Copy one precomputed-embedding shard into our layout, L2-normalised, bad rows counted.
    Columnar throughout (no per-row Python): a 1M-row shard is dominated by parquet I/O."""
    icfg, skipped = cfg.input, Counter()
    try:
        meta, matrix = precomputed_table(path, fmt, icfg)
    except UnreadableFile as exc:  # bytes that do not parse: skipped and counted, as a corrupt tar is
        skip(skipped, "unreadable_shard", shard, None, str(exc), cfg.strict)
        return write_shard(cfg, out_dir, shard, {"uid": [], "shard": [], "key": []}, np.zeros((0, 1), np.float32),
                           skipped, "precomputed", source=source)
    uid = pc.cast(meta[icfg.id_column], pa.string()).combine_chunks()
    ok = normalise_rows(matrix, shard, skipped, uid, cfg.strict)
    duplicate = np.zeros(len(ok), dtype=bool)
    duplicate[ok] = pd.Index(uid.filter(pa.array(ok)).to_numpy(zero_copy_only=False)).duplicated()
    for i in np.flatnonzero(duplicate):  # the first valid copy of a uid stays
        skip(skipped, "duplicate_key", shard, str(uid[i]), "uid repeats within the shard", cfg.strict)
    ok &= ~duplicate
    rows = {"uid": uid, "shard": pa.array(np.full(len(ok), shard, dtype=object), pa.string()), "key": uid}
    nan_labels = 0
    if icfg.label_column in meta.column_names:
        rows["label"], nan_labels = label_strings(meta[icfg.label_column].filter(pa.array(ok)),
                                                  f"{path}: column {icfg.label_column!r}")
        if nan_labels:
            log.warning("shard %s: %d NaN labels read as missing (label null)", shard, nan_labels)
    for src, name in ((icfg.split_column, "split"), ("caption", "text"),
                      ("text", "text"), ("uid", "source_uid")):  # "uid": DataComp's own id column
        if src in meta.column_names and name not in rows:
            rows[name] = pc.cast(meta[src], pa.string()).filter(pa.array(ok))
    for name in ("uid", "shard", "key"):
        rows[name] = rows[name].filter(pa.array(ok))
    return write_shard(cfg, out_dir, shard, rows, matrix[ok], skipped, "precomputed", nan_labels=nan_labels,
                       source=source)


def embed_one(cfg, out_dir: Path, shard: dict, encoder: Encoder | None = None) -> dict:
    """Embed one shard (the unit of work a worker, local or Ray, runs) with ``encoder`` (built once per
    worker process when not given)."""
    start = time.perf_counter()
    source = input_identity(shard["path"])  # before reading: a change from now on is noticed by the next run
    try:
        with retrying(cfg.input.retries, cfg.input.retry_backoff_s):
            if shard["format"] in TABLE_FORMATS:
                info = with_retries(partial(embed_table_shard, cfg, shard["path"], shard["name"], shard["format"],
                                            out_dir, source), shard["name"], shard["path"])
            else:
                info = embed_tar_shard(cfg, shard["path"], shard["name"], out_dir, encoder or get_encoder(cfg),
                                       source)
    except ShardUnavailable as exc:
        info = record_failed(cfg, out_dir, shard["name"], str(exc))
    info["seconds"] = round(time.perf_counter() - start, 3)
    return info


def record_failed(cfg, out_dir: Path, shard: str, error: str) -> dict:
    """A shard still unreachable after the retries: an empty output whose marker says ``failed``, so the later
    stages can go on without it (``input.allow_failed_shards``) and a rerun tries it again."""
    log.error("%s", error)
    write_parquet(out_dir / f"{shard}.parquet", embedding_table({"uid": [], "shard": [], "key": []},
                                                                np.zeros((0, 1), np.float32), cfg.embed.store_dtype))
    info = {"rows": 0, "dim": None, "skipped": {}, "encoder": None, "failed": error}
    mark_done(out_dir, shard, info, files=[out_dir / f"{shard}.parquet"])
    return info


def failed_shards(out_dir: Path, shards: list[dict]) -> dict[str, str]:
    """{shard name: error} of the shards the embed stage could not read."""
    markers = {s["name"]: done_path(out_dir, s["name"]) for s in shards}
    return {name: info["failed"] for name, path in markers.items() if path.exists()
            and (info := read_json(path)).get("failed")}


def embed_with(cfg, out_dir: Path, encoder: Encoder, shard: dict) -> dict:
    return embed_one(cfg, out_dir, shard, encoder)


CPUS_PER_CPU_ACTOR = 4  # without GPUs: a model copy per 4 CPUs (torch threads) rather than one per CPU


def actor_resources(cfg) -> tuple[dict, int]:
    """Ray resources per embedding actor and how many: one per ``ray.embed_gpus`` GPUs when the cluster has
    GPUs (and embed.device is not cpu), else one per ``CPUS_PER_CPU_ACTOR`` CPUs."""
    from ..exec.ray import cluster_cpus, cluster_gpus, largest_node_cpus

    gpus = cluster_gpus(cfg)
    if gpus > 0 and cfg.embed.device != "cpu":
        return {"num_gpus": cfg.ray.embed_gpus, "num_cpus": 1}, max(1, int(gpus / cfg.ray.embed_gpus))
    per = min(CPUS_PER_CPU_ACTOR, largest_node_cpus(cfg))
    return {"num_cpus": per}, max(1, cluster_cpus(cfg) // per)


def embed_shards(cfg, out_dir: Path, shards: list[dict]):
    """Embed ``shards``: table shards as plain tasks; model shards in workers that build the encoder once
    (Ray actors on ``backend: ray``, else this process or a process pool)."""
    models = [s for s in shards if s["format"] not in TABLE_FORMATS]
    tables = [s for s in shards if s["format"] in TABLE_FORMATS]
    if models and cfg.backend == "ray":
        resources, slots = actor_resources(cfg)
        yield from map_with_setup(partial(build_encoder, cfg.embed), partial(embed_with, cfg, out_dir), models, cfg,
                                  resources, slots)
        models = []
    yield from map_unordered(partial(embed_one, cfg, out_dir), models + tables, cfg)


def run_embed(run: Run, input_spec=None) -> None:
    if input_spec is not None:
        discover(run, input_spec)
    save_config(run)
    shards = run.shards
    if any(s["format"] not in TABLE_FORMATS for s in shards) and run.cfg.embed.encoder == "precomputed":
        raise InputError("embed.encoder=precomputed, but the input is webdataset shards; choose an encoder")
    out_dir = prepare_stage(run, "embed")
    retry = failed_shards(out_dir, shards)
    todo = [s for s in shards if not is_done(out_dir, s["name"]) or s["name"] in retry]
    log.info("embed: %d shards, %d already done", len(shards), len(shards) - len(todo))
    with timed(run, "embed"), progress(len(todo), "embed") as bar:
        rate = Rate()
        for info in embed_shards(run.cfg, out_dir, todo):
            rate.add(bar, info["rows"])
    check_failed(run, out_dir, retry)
    check_any_rows(out_dir, [s["name"] for s in shards])
    dims = {read_done_dim(out_dir, s["name"]) for s in shards} - {None}
    if len(dims) > 1:
        raise InputError(f"embed: shards have mixed embedding dimensions {sorted(dims)}; they cannot be clustered together")
    write_json(run.info_path("embed"), {"shards": len(shards), "dim": dims.pop() if dims else None,  # written last
                                        "failed": sorted(failed_shards(out_dir, shards))})


def check_failed(run: Run, out_dir: Path, retried: dict) -> None:
    """After embedding: clear the later stages if a shard that failed before was read now (they ran without
    it); stop naming the shards that still fail, unless ``input.allow_failed_shards``."""
    failed = failed_shards(out_dir, run.shards)
    if set(retried) - set(failed):
        log.warning("embed: %d shards that failed before were read now; redoing the later stages",
                    len(set(retried) - set(failed)))
        clear_outputs(run)
        for later in STAGES[1:]:
            clean_stage(run.dir(later))
    if failed and not run.cfg.input.allow_failed_shards:
        names = ", ".join(sorted(failed)[:10]) + (f" and {len(failed) - 10} more" if len(failed) > 10 else "")
        raise StageError(f"embed: {len(failed)} of {len(run.shards)} shards could not be read after "
                         f"{run.cfg.input.retries} retries: {names}; rerun to retry them, or pass "
                         "--allow-failed-shards (input.allow_failed_shards=true) to go on without them")


def read_done_dim(out_dir: Path, shard: str):
    return read_json(done_path(out_dir, shard)).get("dim")
