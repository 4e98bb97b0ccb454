"""Teacher stage: teacher logits computed once per kept sample, stored beside the manifest (teacher/)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import FILE, FILE_OR_NAME, absolute_paths
from ..errors import ConfigError, InputError
from ..params import check_fields, setting
from ..io.files import (clean_stage, damaged_units, done_path, is_done, mark_done, match_empty_schemas, read_json,
                        write_json, write_parquet)
from ..run import RunLayout
from .stored_logits import full_table, topk, topk_table  # noqa: F401 (topk: importable here, as before)

log = logging.getLogger(__name__)

SOURCES = ("zero_shot", "module", "logits")
MAX_FULL_CLASSES = 4096  # up to this many classes the full logits are stored (float16: 8 KB a sample at most)


@dataclass(frozen=True)
class TeacherConfig:
    """What the teacher is and what it runs on. Class i of the teacher is ``classes[i]``: integer manifest labels
    index the classes directly, string labels are looked up by name."""

    source: str = setting("zero_shot", choices=SOURCES)
    top_k: int | None = setting(None, ge=1, le=MAX_FULL_CLASSES * 256)  # None: full logits (exact KD); k: opt-in top-k plus a tail bin (very many classes)
    on: str = setting("auto", choices=("auto", "embeddings", "images"))  # what zero_shot / module teachers read
    samples: str = setting("kept", choices=("kept", "all"))
    classes: tuple[str, ...] = ()  # class names (zero_shot needs them)
    templates: tuple[str, ...] = ("a photo of a {}.",)  # zero_shot prompts, averaged per class
    logit_scale: float = setting(100.0, gt=0.0, le=1e6)  # zero_shot: logits = scale * cosine (CLIP's trained scale)
    model: str | None = None  # zero_shot open_clip model; None: the run's embed.model / model_config / pretrained
    model_config: FILE | None = None
    pretrained: FILE_OR_NAME | None = None
    allow_random_weights: bool | None = None
    module: str | None = None  # module: "package.module:ClassName" -> nn.Module returning [n, C] logits
    weights: FILE | None = None  # module: safetensors state dict
    logits: FILE | None = None  # logits: parquet (uid, logits list<float>) or .npy [n, C] + same-name parquet (uid)
    batch_size: int = setting(256, ge=1, le=1 << 24)
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))

    def __post_init__(self):
        check_fields(self, "teacher")
        need = {"zero_shot": ("classes", "class names (--classes a,b,c or --classes-file)"),
                "module": ("module", "an import path 'package.module:ClassName'"), "logits": ("logits", "a file")}
        field, what = need[self.source]
        if not getattr(self, field):
            raise ConfigError(f"config key 'teacher.{field}': teacher.source={self.source} needs {what}")


@dataclass
class Teacher:
    """A built teacher: ``fn`` maps a batch (embeddings [n, d] float32 or prepared images) to [n, C] logits."""

    name: str
    on: str  # embeddings | images | logits
    fn: Callable
    prepare: Callable | None = None  # images: PIL image -> model input


# ---------------------------------------------------------------- building teachers (heavy imports inside)
def _embed_cfg(tcfg: TeacherConfig, run_cfg):
    """The open_clip settings of a zero-shot teacher: the given ones, else the run's embed config."""
    from ..config import EmbedConfig

    base = run_cfg.embed if run_cfg.embed.encoder == "open_clip" else EmbedConfig()
    pick = {k: getattr(tcfg, k) for k in ("model", "model_config", "pretrained", "allow_random_weights")
            if getattr(tcfg, k) is not None}
    if "model" in pick and "model_config" not in pick:
        pick["model_config"] = None
    return dataclasses.replace(base, encoder="open_clip", device=tcfg.device, batch_size=tcfg.batch_size, **pick)


def _same_model(a, b) -> bool:
    keys = ("encoder", "model", "model_config", "pretrained")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and b.modality == "image"


def build_zero_shot(tcfg: TeacherConfig, run_cfg) -> Teacher:
    """CLIP zero-shot: class weights from prompts (text tower); logits = scale * cos(image embedding, class)."""
    import torch

    from ..embed import build_encoder

    ecfg = _embed_cfg(tcfg, run_cfg)
    on = tcfg.on if tcfg.on != "auto" else ("embeddings" if _same_model(ecfg, run_cfg.embed) else "images")
    if on == "embeddings" and not _same_model(ecfg, run_cfg.embed):
        raise ConfigError("config key 'teacher.on': the run's embeddings come from another model than the zero-shot "
                          "teacher's; use on=images, or the run's open_clip model")
    text = build_encoder(dataclasses.replace(ecfg, modality="text"))
    weights = []
    for name in tcfg.classes:
        emb = text.forward([t.format(name) for t in tcfg.templates]).mean(axis=0)
        weights.append(emb / max(np.linalg.norm(emb), 1e-12))
    w = torch.from_numpy(np.stack(weights).astype(np.float32))
    name = f"zero_shot:{text.name}:{len(tcfg.classes)}classes"
    if on == "embeddings":
        return Teacher(name, on, lambda x: tcfg.logit_scale * torch.as_tensor(x, dtype=torch.float32) @ w.T)
    image = build_encoder(dataclasses.replace(ecfg, modality="image"))
    return Teacher(name, on, lambda b: tcfg.logit_scale * torch.from_numpy(image.forward(b)) @ w.T, image.prepare)


def build_module(tcfg: TeacherConfig, run_cfg) -> Teacher:
    """A user's nn.Module by import path; on images when it defines ``transform(pil) -> tensor`` (or on=images)."""
    import torch

    from ..embed import load_object, pick_device

    cls = load_object(tcfg.module, key="teacher.module")
    model = cls()
    if tcfg.weights:
        from safetensors.torch import load_file

        if not Path(tcfg.weights).is_file():
            raise ConfigError(f"config key 'teacher.weights': {tcfg.weights}: no such file")
        model.load_state_dict(load_file(tcfg.weights))
    elif not tcfg.allow_random_weights:
        raise ConfigError("config key 'teacher.weights': a module teacher needs trained weights (safetensors); "
                          "set allow_random_weights=true only for tests")
    device = pick_device(tcfg.device)
    model.to(device).eval()
    transform = getattr(model, "transform", None)
    on = tcfg.on if tcfg.on != "auto" else ("images" if transform is not None else "embeddings")
    if on == "images" and transform is None:
        from torchvision import transforms as T

        transform = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor()])

    def forward(batch):
        with torch.no_grad():
            x = torch.stack(batch) if on == "images" else torch.as_tensor(batch, dtype=torch.float32)
            return model(x.to(device)).float().cpu()

    return Teacher(f"module:{tcfg.module}:" + (Path(tcfg.weights).name if tcfg.weights else "RANDOM-INIT"), on,
                   forward, transform if on == "images" else None)


def build_logits(tcfg: TeacherConfig, run_cfg) -> Teacher:
    """Supplied logits: rows looked up by uid."""
    from ..io.tables import column_to_matrix, load_npy, read_parquet

    path = tcfg.logits
    if path.endswith(".npy"):
        matrix, ids = load_npy(path), read_parquet(str(Path(path).with_suffix(".parquet")), columns=["uid"])
    else:
        table = read_parquet(path, columns=["uid", "logits"])
        matrix, ids = column_to_matrix(table["logits"], path), table
    if matrix.ndim != 2 or len(matrix) != ids.num_rows:
        raise InputError(f"{path}: logits of shape {matrix.shape} do not match {ids.num_rows} uids")
    row = {u: i for i, u in enumerate(ids["uid"].to_pylist())}

    def lookup(uids):
        missing = [u for u in uids if u not in row]
        if missing:
            raise InputError(f"{path}: no logits for uid {missing[0]!r} ({len(missing)} missing in this batch)")
        return matrix[[row[u] for u in uids]].astype(np.float32)

    return Teacher(f"logits:{Path(path).name}", "logits", lookup)


BUILDERS = {"zero_shot": build_zero_shot, "module": build_module, "logits": build_logits}


def build_teacher(tcfg: TeacherConfig, run_cfg) -> Teacher:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BUILDERS[tcfg.source](tcfg, run_cfg)


# ---------------------------------------------------------------- the stage
def selected_rows(run_dir: Path, shard: str, samples: str) -> pa.Table:
    from .reshard import manifest_shard

    table = manifest_shard(run_dir, shard, ("uid", "key", "keep"))
    return table if samples == "all" else table.filter(table["keep"])


def shard_logits(teacher: Teacher, run_dir: Path, run_cfg, shard: dict, rows: pa.Table, batch: int) -> np.ndarray:
    """[m, C] float32 teacher logits for ``rows`` (manifest order)."""
    from .reshard import input_path

    uids = rows["uid"].to_pylist()
    if teacher.on == "logits":
        return _batched(teacher.fn, uids, batch)
    if teacher.on == "embeddings":
        from ..io.tables import column_to_matrix

        path = RunLayout(run_dir).shard_file("embed", shard["name"])
        table = pq.read_table(path, columns=["uid", "embedding"])
        pos = {u: i for i, u in enumerate(table["uid"].to_pylist())}
        matrix = column_to_matrix(table["embedding"], str(path))
        return _batched(teacher.fn, matrix[[pos[u] for u in uids]], batch)
    return _image_logits(teacher, run_cfg, {**shard, "path": input_path(shard, run_dir)}, rows["key"].to_pylist(),
                         batch)


def _batched(fn, items, batch: int) -> np.ndarray:
    parts = [_checked(fn(items[i:i + batch]), len(items[i:i + batch])) for i in range(0, len(items), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _checked(out, n: int) -> np.ndarray:
    """A teacher's output for a batch of ``n`` as float32 [n, classes]; any other shape names the problem."""
    out = np.asarray(out, dtype=np.float32)
    if out.ndim != 2 or len(out) != n:
        raise InputError(f"the teacher gives outputs of shape {list(out.shape)} for a batch of {n} samples; a "
                         "teacher returns [samples, classes] logits: is it a classifier?")
    return out


def _image_logits(teacher: Teacher, run_cfg, shard: dict, keys: list[str], batch: int) -> np.ndarray:
    from collections import Counter

    from ..embed import decode_input
    from ..io.webdataset import iter_tar_samples

    wanted = {k: i for i, k in enumerate(keys)}
    out: list = [None] * len(keys)
    items, where = [], []

    def flush():
        for i, row in zip(where, _checked(teacher.fn(items), len(items))):
            out[i] = row
        items.clear()
        where.clear()

    for sample in iter_tar_samples(shard["path"], shard["name"], Counter()):
        i = wanted.pop(sample["__key__"], None)
        if i is None:
            continue
        try:
            image = decode_input(sample, "image", run_cfg.input.image_keys, ())
        except ValueError as exc:
            raise InputError(f"shard {shard['name']}, key {sample['__key__']}: {exc}") from None
        items.append(teacher.prepare(image))
        where.append(i)
        if len(items) >= batch:
            flush()
        if not wanted:
            break  # every needed sample found: the rest of the tar is not read
    if items:
        flush()
    if wanted:
        raise InputError(f"shard {shard['name']} ({shard['path']}): {len(wanted)} samples are not in the tar "
                         f"(first key {next(iter(wanted))!r}); did the shard change since the run?")
    return np.stack(out) if out else np.zeros((0, 0), np.float32)


def fingerprint(tcfg: TeacherConfig, run_dir: Path, shards: list[dict]) -> str:
    """The teacher config, the logits file's size and mtime, and the manifest's content (its files' sha256)."""
    data = dataclasses.asdict(tcfg)
    manifest = RunLayout(run_dir).dir("manifest")
    data["manifest"] = [(read_json(done_path(manifest, s["name"])).get("files") or {}) for s in shards]
    if tcfg.logits and Path(tcfg.logits).exists():
        st = Path(tcfg.logits).stat()
        data["logits_file"] = [st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_teacher(run_dir: str | Path, tcfg: TeacherConfig) -> dict:
    """Write teacher/<shard>.parquet for every kept sample: by default ``logits`` float16 [C] (each row shifted
    so its max is 0); with ``top_k``, ``topk_values``, ``topk_indices`` and ``tail_lse`` (see ``topk``). Also a
    done marker per shard and ``RunLayout.teacher_info``. Resumes (a shard whose file was lost is redone); a
    changed teacher config or manifest redoes it all, but the old outputs stay until the new teacher is built and
    has given valid logits. Holds the run folder's lock: one writer at a time."""
    from .reshard import run_shards
    from ..run import load_run_config, locked, progress

    layout, tcfg = RunLayout(run_dir), TeacherConfig(**absolute_paths(dataclasses.asdict(tcfg), TeacherConfig))
    run_dir, out = layout.root, layout.dir("teacher")
    with locked(run_dir):
        run_cfg, shards = load_run_config(run_dir), run_shards(run_dir)
        fp, marker = fingerprint(tcfg, run_dir, shards), layout.marker("teacher")
        stale = marker.exists() and read_json(marker).get("fingerprint") != fp
        lost = {} if stale else damaged_units(out)
        if lost:
            log.warning("teacher: redoing %d shard(s) whose files are missing or changed: %s", len(lost),
                        ", ".join(f"{n} ({files[0][0]} is {files[0][1]})" for n, files in sorted(lost.items())[:5]))
        todo = [s for s in shards if stale or s["name"] in lost or not is_done(out, s["name"])]
        pending, teacher = [], None
        with progress(len(todo), "teacher") as bar:
            for shard in todo:
                teacher = teacher or _checked_teacher(tcfg, run_cfg, shards)
                pending.append((shard, *_teacher_table(teacher, tcfg, run_dir, run_cfg, shard)))
                if stale and pending[-1][3] == 0 and shard is not todo[-1]:
                    continue  # the old outputs go only once a shard with rows gave valid logits
                if stale:
                    log.warning("teacher: config or manifest changed since the last run; replacing the outputs")
                    clean_stage(out)
                    stale = False
                out.mkdir(parents=True, exist_ok=True)
                if not marker.exists():
                    write_json(marker, {"stage": "teacher", "fingerprint": fp})
                for done in pending:
                    _write_shard(layout, *done)
                    bar.update(1)
                pending = []
        return _write_info(layout, tcfg, shards)


def _checked_teacher(tcfg: TeacherConfig, run_cfg, shards: list[dict]) -> Teacher:
    """``build_teacher``, refused (before a model is loaded where that is known) when it reads images and the
    run's input has none (precomputed embeddings)."""
    formats = sorted({s["format"] for s in shards} - {"webdataset"})

    def refuse(name: str):
        raise ConfigError(f"config key 'teacher.on': teacher {name} reads images, but this run's input is "
                          f"{formats[0]} (embeddings, no images); use --on embeddings with the run's own open_clip "
                          "model, a --source module teacher on embeddings, or --source logits")

    zero_shot_on_images = tcfg.source == "zero_shot" and tcfg.on == "auto" and not _same_model(
        _embed_cfg(tcfg, run_cfg), run_cfg.embed)
    if formats and (tcfg.on == "images" or zero_shot_on_images):
        refuse(tcfg.source)
    teacher = build_teacher(tcfg, run_cfg)
    if teacher.on == "images" and formats:
        refuse(teacher.name)
    return teacher


def _teacher_table(teacher: Teacher, tcfg: TeacherConfig, run_dir: Path, run_cfg, shard: dict) -> tuple:
    """(table, done-marker info, rows) of one shard, checked: as many logits as classes, finite, a 2-D batch."""
    rows = selected_rows(run_dir, shard["name"], tcfg.samples)
    logits = shard_logits(teacher, run_dir, run_cfg, shard, rows, tcfg.batch_size)
    if len(logits) and tcfg.classes and logits.shape[1] != len(tcfg.classes):
        raise InputError(f"teacher {teacher.name} gives {logits.shape[1]} logits per sample but "
                         f"teacher.classes names {len(tcfg.classes)} classes")
    if len(logits) and not np.isfinite(logits).all():
        raise InputError(f"teacher {teacher.name}: non-finite logits in shard {shard['name']}")
    n_classes = int(logits.shape[1]) if len(logits) else None
    if tcfg.top_k is None and n_classes is not None and n_classes > MAX_FULL_CLASSES:
        raise ConfigError(f"config key 'teacher.top_k': the teacher has {n_classes} classes, more than the "
                          f"{MAX_FULL_CLASSES} stored in full; opt in to top-k plus a tail bin (--top-k K), an "
                          "approximation of KD (docs/methods.md#kd-knowledge-distillation-on-pruned-data)")
    uids = rows["uid"].to_pylist()
    if tcfg.top_k is None:
        table, clamped = full_table(uids, logits if len(logits) else np.zeros((0, len(tcfg.classes)), np.float32))
    else:
        table, clamped = topk_table(uids, logits, min(tcfg.top_k, n_classes or tcfg.top_k))
    if clamped:
        log.warning("teacher: shard %s: %d logits more than 65,504 below their row's top were clamped to -65,504 "
                    "(float16's lowest; their probability is 0 either way)", shard["name"], clamped)
    info = {"rows": len(rows), "num_classes": n_classes, "clamped": clamped, "teacher": teacher.name, "on": teacher.on,
            "top_k": None if tcfg.top_k is None or n_classes is None else min(tcfg.top_k, n_classes)}
    return table, info, len(rows)


def _write_shard(layout: RunLayout, shard: dict, table, info: dict, rows: int) -> None:
    path = layout.shard_file("teacher", shard["name"])
    write_parquet(path, table)
    mark_done(layout.dir("teacher"), shard["name"], info, files=[path])


def _write_info(layout, tcfg: TeacherConfig, shards: list[dict]) -> dict:
    out = layout.dir("teacher")
    marks = [read_json(done_path(out, s["name"])) for s in shards]
    classes = {m["num_classes"] for m in marks} - {None}
    if len(classes) > 1:
        raise InputError(f"teacher outputs in {out} disagree on the number of classes {sorted(classes)}; delete it")
    info = {"source": tcfg.source, "teacher": next((m["teacher"] for m in marks), None),
            "on": next((m["on"] for m in marks), None), "samples": tcfg.samples,
            "rows": sum(m["rows"] for m in marks), "num_classes": classes.pop() if classes else len(tcfg.classes),
            "clamped_logits": sum(m.get("clamped", 0) for m in marks),
            "format": "full" if tcfg.top_k is None else "topk",
            "top_k": None if tcfg.top_k is None else max([m["top_k"] or 0 for m in marks], default=0),
            "classes": list(tcfg.classes),
            "logits": "teacher logits before any temperature, each row shifted so its max is 0 (softmax unchanged)"
                      + ("" if tcfg.top_k is None else "; topk: k largest, tail_lse = logsumexp(other logits / T) "
                         "at T in tail_temperatures"),
            "config": dataclasses.asdict(tcfg)}
    if tcfg.top_k is not None:
        from .kd import TAIL_TEMPERATURES

        info["tail_temperatures"] = list(TAIL_TEMPERATURES)
    match_empty_schemas(out, {s["name"]: layout.shard_file("teacher", s["name"]) for s in shards})
    write_json(layout.teacher_info, info)
    return info

