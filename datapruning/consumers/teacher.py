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
from ..io.files import (clean_stage, done_path, is_done, mark_done, match_empty_schemas, read_json, write_json,
                        write_parquet)
from ..run import RunLayout

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


# ---------------------------------------------------------------- pure part: logits -> stored form
def shifted(logits: np.ndarray) -> np.ndarray:
    """Logits minus each row's max (float32): softmax is unchanged, and float16 is finest where the mass is."""
    logits = np.asarray(logits, dtype=np.float32)
    return logits - logits.max(axis=1, keepdims=True) if logits.size else logits


def topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k largest shifted logits per row, descending (ties: lower class first), as float16 values and int32
    indices, and the tail: float32 [n, len(TAIL_TEMPERATURES)] logsumexp of the other shifted logits / T."""
    from .kd import TAIL_TEMPERATURES

    z = shifted(logits)
    k = min(k, z.shape[1])
    idx = np.argsort(-z, axis=1, kind="stable")[:, :k]
    rest = z.copy()
    np.put_along_axis(rest, idx, -np.inf, axis=1)
    tail = np.full((len(z), len(TAIL_TEMPERATURES)), -np.inf, np.float32)
    if k < z.shape[1]:
        for c, T in enumerate(TAIL_TEMPERATURES):
            r = rest.astype(np.float64) / T
            top = r.max(axis=1, keepdims=True)
            tail[:, c] = (top[:, 0] + np.log(np.exp(r - top).sum(axis=1))).astype(np.float32)
    return np.take_along_axis(z, idx, axis=1).astype(np.float16), idx.astype(np.int32), tail


def _fixed(values: np.ndarray, n: int, width: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width) if n else \
        pa.array([], pa.list_(pa.from_numpy_dtype(values.dtype), width))


def full_table(uids: list[str], logits: np.ndarray) -> pa.Table:
    """uid and ``logits``: every class's logit minus the row's max, float16 [C]."""
    z = shifted(logits).astype(np.float16)
    return pa.table({"uid": pa.array(uids, pa.string()), "logits": _fixed(z, len(z), z.shape[1] if z.ndim == 2 else 0)})


def topk_table(uids: list[str], logits: np.ndarray, k: int) -> pa.Table:
    """uid, ``topk_values`` float16 [k], ``topk_indices`` int32 [k] and ``tail_lse`` float32 [temperatures]."""
    from .kd import TAIL_TEMPERATURES

    if len(logits):
        values, indices, tail = topk(logits, k)
    else:
        values, indices = np.zeros((0, k), np.float16), np.zeros((0, k), np.int32)
        tail = np.zeros((0, len(TAIL_TEMPERATURES)), np.float32)
    n = len(values)
    return pa.table({"uid": pa.array(uids, pa.string()), "topk_values": _fixed(values, n, values.shape[1]),
                     "topk_indices": _fixed(indices, n, indices.shape[1]), "tail_lse": _fixed(tail, n, tail.shape[1])})


# ---------------------------------------------------------------- the stage
def selected_rows(run_dir: Path, shard: str, samples: str) -> pa.Table:
    from .reshard import manifest_shard

    table = manifest_shard(run_dir, shard, ("uid", "key", "keep"))
    return table if samples == "all" else table.filter(table["keep"])


def shard_logits(teacher: Teacher, run_dir: Path, run_cfg, shard: dict, rows: pa.Table, batch: int) -> np.ndarray:
    """[m, C] float32 teacher logits for ``rows`` (manifest order)."""
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
    return _image_logits(teacher, run_cfg, shard, rows["key"].to_pylist(), batch)


def _batched(fn, items, batch: int) -> np.ndarray:
    parts = [np.asarray(fn(items[i:i + batch]), dtype=np.float32) for i in range(0, len(items), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _image_logits(teacher: Teacher, run_cfg, shard: dict, keys: list[str], batch: int) -> np.ndarray:
    from collections import Counter

    from ..embed import decode_input
    from ..io.webdataset import iter_tar_samples

    wanted = {k: i for i, k in enumerate(keys)}
    out: list = [None] * len(keys)
    items, where = [], []

    def flush():
        for i, row in zip(where, np.asarray(teacher.fn(items), dtype=np.float32)):
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


def fingerprint(tcfg: TeacherConfig, run_dir: Path) -> str:
    data = dataclasses.asdict(tcfg)
    stage = RunLayout(run_dir).marker("manifest")
    data["manifest"] = read_json(stage).get("fingerprint") if stage.exists() else None
    if tcfg.logits and Path(tcfg.logits).exists():
        st = Path(tcfg.logits).stat()
        data["logits_file"] = [st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_teacher(run_dir: str | Path, tcfg: TeacherConfig) -> dict:
    """Write teacher/<shard>.parquet for every kept sample: by default ``logits`` float16 [C] (each row shifted
    so its max is 0); with ``top_k``, ``topk_values``, ``topk_indices`` and ``tail_lse`` (see ``topk``). Also a
    done marker per shard and ``RunLayout.teacher_info``. Resumes; a changed teacher config redoes it all."""
    from .reshard import run_shards
    from ..run import load_run_config, progress

    layout, tcfg = RunLayout(run_dir), TeacherConfig(**absolute_paths(dataclasses.asdict(tcfg), TeacherConfig))
    run_dir, out = layout.root, layout.dir("teacher")
    run_cfg, shards = load_run_config(run_dir), run_shards(run_dir)
    fp = fingerprint(tcfg, run_dir)
    marker = layout.marker("teacher")
    if tcfg.source == "module":  # a bad --module fails here, before the cached outputs are cleared
        from ..embed import load_object

        load_object(tcfg.module, key="teacher.module")
    if marker.exists() and read_json(marker).get("fingerprint") != fp:
        log.warning("teacher: config or manifest changed since the last run; recomputing the teacher outputs")
        clean_stage(out)
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        write_json(marker, {"stage": "teacher", "fingerprint": fp})
    teacher = None
    with progress(len(shards), "teacher") as bar:
        for shard in shards:
            if not is_done(out, shard["name"]):
                teacher = teacher or build_teacher(tcfg, run_cfg)
                _teacher_shard(teacher, tcfg, run_dir, run_cfg, shard, out)
            bar.update(1)
    return _write_info(layout, tcfg, shards)


def _teacher_shard(teacher: Teacher, tcfg: TeacherConfig, run_dir: Path, run_cfg, shard: dict, out: Path) -> None:
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
        table = full_table(uids, logits if len(logits) else np.zeros((0, len(tcfg.classes)), np.float32))
    else:
        table = topk_table(uids, logits, min(tcfg.top_k, n_classes or tcfg.top_k))
    write_parquet(RunLayout(run_dir).shard_file("teacher", shard["name"]), table)
    mark_done(out, shard["name"], {"rows": len(rows), "num_classes": n_classes,
                                   "top_k": None if tcfg.top_k is None or n_classes is None
                                   else min(tcfg.top_k, n_classes), "teacher": teacher.name, "on": teacher.on})


def _write_info(layout, tcfg: TeacherConfig, shards: list[dict]) -> dict:
    out = layout.dir("teacher")
    marks = [read_json(done_path(out, s["name"])) for s in shards]
    classes = {m["num_classes"] for m in marks} - {None}
    if len(classes) > 1:
        raise InputError(f"teacher outputs in {out} disagree on the number of classes {sorted(classes)}; delete it")
    info = {"source": tcfg.source, "teacher": next((m["teacher"] for m in marks), None),
            "on": next((m["on"] for m in marks), None), "samples": tcfg.samples,
            "rows": sum(m["rows"] for m in marks), "num_classes": classes.pop() if classes else len(tcfg.classes),
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

