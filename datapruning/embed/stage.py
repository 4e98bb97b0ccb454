"""Embed stage: input shards -> embeddings/{shard}.parquet (uid, shard, key, label, split, text, embedding)."""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np

from .decoders import choose_decoder
from .encoders import Encoder, build_encoder
from .pipeline import embed_chain
from .samples import embedding_table
from .tables import embed_table_shard
from ..errors import InputError, StageError
from ..io.files import (check_any_rows, clean_stage, done_path, is_done, mark_done, match_empty_schemas, read_json,
                        write_json, write_parquet)
from ..io.shards import check_output, detect_format, expand_input, input_identity, shard_names
from ..io.tables import npz_key_for
from ..io.webdataset import ShardUnavailable, retrying, with_retries
from ..run import STAGES, Rate, Run, clear_outputs, log, prepare_stage, progress, save_config, timed

TABLE_FORMATS = ("parquet", "clip_retrieval", "npy", "datacomp")


def discover(run: Run, input_spec) -> list[dict]:
    """Resolve the input into shards.json (path, name, format); a rerun must name the same input."""
    paths = expand_input(input_spec, side="text_emb" if run.cfg.embed.modality == "text" else "img_emb")
    check_output(run.output, input_spec, paths)
    fmt = detect_format(paths, run.cfg.input.format)
    shards = [{"path": p, "name": n, "format": fmt} for p, n in zip(paths, shard_names(paths))]
    run.output.mkdir(parents=True, exist_ok=True)
    write_json(run.layout.shards, {"shards": shards})
    return shards


_ENCODER_CACHE: dict[str, Encoder] = {}


def get_encoder(cfg) -> Encoder:
    """Build the encoder once per worker process (never pickled from the driver)."""
    key = repr(cfg.embed)
    if key not in _ENCODER_CACHE:
        _ENCODER_CACHE[key] = build_encoder(cfg.embed)
    return _ENCODER_CACHE[key]


_DECODER_CACHE: dict[tuple, tuple] = {}


def get_decoder(cfg, encoder: Encoder):
    """The decode step for ``encoder``, built once per worker process and kept (DALI pipelines, CPU pools)."""
    key = (repr(cfg.embed), repr(cfg.input), id(encoder))
    if key not in _DECODER_CACHE:  # the entry holds the encoder too, so its id is not reused while cached
        _DECODER_CACHE[key] = (encoder, choose_decoder(cfg, encoder))
    return _DECODER_CACHE[key][1]


def embed_tar_shard(cfg, path: str, shard: str, out_dir: Path, encoder: Encoder, source: dict | None = None,
                    decoder=None) -> dict:
    """Read one webdataset tar, embed its samples in batches through the chain (``embed.pipeline``) with the
    decode step ``embed.image_decode`` picks (or ``decoder``), write parquet + done marker; ``source``: the
    input file's identity (``io.shards.input_identity``)."""
    decoder = decoder or get_decoder(cfg, encoder)
    return embed_chain(cfg, path, shard, out_dir, encoder, decoder, decoder.name, decoder.fast, source)


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


def embed_shards(run: Run, out_dir: Path, shards: list[dict]):
    """Embed ``shards``: table shards as plain tasks; model shards in workers that build the encoder once
    (Ray actors on ``backend: ray``, else this process or a process pool)."""
    cfg, ex = run.cfg, run.executor
    models = [s for s in shards if s["format"] not in TABLE_FORMATS]
    tables = [s for s in shards if s["format"] in TABLE_FORMATS]
    if models and cfg.backend == "ray":
        resources, slots = actor_resources(cfg)
        yield from ex.map_with_setup(partial(build_encoder, cfg.embed), partial(embed_with, cfg, out_dir), models,
                                     resources, slots)
        models = []
    yield from ex.map_unordered(partial(embed_one, cfg, out_dir), models + tables)


def run_embed(run: Run, input_spec=None) -> None:
    if input_spec is not None:
        discover(run, input_spec)
    save_config(run)
    shards = run.shards
    if any(s["format"] not in TABLE_FORMATS for s in shards) and run.cfg.embed.encoder == "precomputed":
        raise InputError("embed.encoder=precomputed, but the input is webdataset shards; choose an encoder")
    if any(s["format"] == "datacomp" for s in shards):
        npz_key_for(run.cfg.input.npz_key, run.cfg.embed.modality)
    out_dir = prepare_stage(run, "embed")
    retry = failed_shards(out_dir, shards)
    todo = [s for s in shards if not is_done(out_dir, s["name"]) or s["name"] in retry]
    log.info("embed: %d shards, %d already done", len(shards), len(shards) - len(todo))
    with timed(run, "embed"), progress(len(todo), "embed") as bar:
        rate = Rate()
        for info in embed_shards(run, out_dir, todo):
            rate.add(bar, info["rows"])
    check_failed(run, out_dir, retry)
    check_any_rows(out_dir, [s["name"] for s in shards])
    match_empty_schemas(out_dir, {s["name"]: run.layout.shard_file("embed", s["name"]) for s in shards})
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
