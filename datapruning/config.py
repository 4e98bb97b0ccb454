"""Run configuration: frozen dataclasses loaded from YAML (safe_load) with dotted ``--set`` overrides."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Mapping

import yaml

from .errors import ConfigError
from .params import MAX_INT, parse_params, setting, show

# Config fields that name local files are recorded absolute and normalised (``absolute_paths``), so a run
# folder's config.json, and recommended.yaml made from it, work from any directory.
FILE = Annotated[str, "file"]  # always a local path
FILE_OR_NAME = Annotated[str, "file or name"]  # a path when it exists or starts with /, ./, ../ or ~; else a name


@dataclass(frozen=True)
class InputConfig:
    format: str = setting("auto", choices=("auto", "webdataset", "parquet", "clip_retrieval", "npy", "datacomp"))
    id_column: str = "uid"
    embedding_column: str = "embedding"
    label_column: str = "label"
    split_column: str = "split"
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    text_keys: tuple[str, ...] = ("txt", "json")
    label_key: str = "cls"
    # datacomp: which array of the .npz beside each metadata parquet is the embedding
    npz_key: str = setting("l14_img", choices=("l14_img", "b32_img", "l14_txt", "b32_txt"))
    retries: int = setting(3, ge=0, le=100)  # a shard that cannot be reached (network, I/O) is tried again ...
    retry_backoff_s: float = setting(1.0, ge=0.0, le=600.0)  # ... after waits of about this, doubling each time
    allow_failed_shards: bool = False  # go on without shards still unreachable after the retries


@dataclass(frozen=True)
class EmbedConfig:
    encoder: str = "open_clip"  # a key of datapruning.embed.ENCODERS
    model: FILE_OR_NAME = "ViT-B-32"  # open_clip model name, or a sentence-transformers folder
    pretrained: FILE_OR_NAME | None = "laion2b_s34b_b79k"  # open_clip tag or local checkpoint path
    model_config: FILE | None = None  # JSON file with a custom open_clip architecture
    allow_random_weights: bool = False  # never use random weights unless asked
    # pair: both open_clip towers on every sample (image-text), or precomputed pairs
    modality: str = setting("image", choices=("image", "text", "pair"))
    module: str | None = None  # torch_module encoder: "package.module:ClassName"
    weights: FILE | None = None  # torch_module encoder: safetensors file
    batch_size: int = setting(256, ge=1, le=MAX_INT)
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    decode_workers: int = setting(2, ge=0, le=256)  # threads decoding batches ahead of the model (0: on its thread)
    prefetch: int = setting(2, ge=1, le=1024)  # batches decoded ahead of the model, per decode thread
    # auto (dali, else tensor, on CUDA) | tensor (JPEG decode+resize as tensors, nvjpeg on CUDA) | dali | pil
    image_decode: str = setting("auto", choices=("auto", "tensor", "dali", "pil"))
    store_dtype: str = setting("float32", choices=("float32", "float16"))  # on disk


@dataclass(frozen=True)
class ClusterConfig:
    k: int = setting(100, ge=1, le=10_000_000)
    niter: int = setting(20, ge=1, le=100_000)
    fit_fraction: float | None = setting(None, ge=0.0, le=1.0)  # None: k * max_points_per_centroid points
    max_points_per_centroid: int = setting(256, ge=1, le=MAX_INT)
    fit_mib: int = setting(128, ge=1, le=MAX_INT)  # a larger fit sample is kept on disk (kmeans_stream)
    backend: str = setting("auto", choices=("auto", "faiss", "faiss-gpu", "torch"))
    assign_batch: int = setting(65536, ge=1, le=MAX_INT)
    partition: bool = True  # also write the embeddings grouped by cluster (per-cluster metrics need it)
    partition_mib: int = setting(256, ge=1, le=MAX_INT)  # float32 embedding bytes per group of clusters


@dataclass(frozen=True)
class ScoreConfig:
    metrics: tuple[str, ...] = ("ssp", "random")
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SelectConfig:
    method: str = "rank"  # a key of datapruning.select.SELECTORS
    metric: str | None = None  # the score a selector ranks by (each selector has its default)
    mode: str = setting("hard", choices=("hard", "easy", "random"))
    keep_fraction: float | None = setting(0.5, ge=0.0, le=1.0)
    keep_count: int | None = setting(None, ge=0, le=2 ** 62)  # takes precedence over keep_fraction when set
    min_per_cluster: float = setting(0.0, ge=0.0, le=1.0)  # minimum share of the budget spread over clusters
    min_per_label: float = setting(0.0, ge=0.0, le=1.0)
    dedup_eps: float | None = setting(None, ge=0.0, le=2.0)  # SemDeDup filter before selection, by eps ...
    dedup_keep_fraction: float | None = setting(None, ge=0.0, le=1.0)  # ... or by the kept fraction to reach
    filters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # {metric: {threshold | keep_fraction}}
    params: Mapping[str, Any] = field(default_factory=dict)  # selector-specific (tau, l, beta, ...)

    def check(self):
        if self.dedup_eps is not None and self.dedup_keep_fraction is not None:
            raise ConfigError("config keys 'select.dedup_eps' and 'select.dedup_keep_fraction': give one, not both "
                              "(--set select.dedup_eps=null unsets one)")
        if self.keep_fraction is None and self.keep_count is None:
            raise ConfigError("config key 'select.keep_fraction': give select.keep_fraction or select.keep_count")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local instance; "auto", "host:6379" or "ray://host:10001"
    num_cpus: int | None = setting(None, ge=1, le=1 << 20)  # 0 CPUs: every task would wait forever
    embed_gpus: float = setting(1.0, gt=0.0, le=1024.0)  # GPUs per embedding actor when CUDA is present
    retries: int = setting(3, ge=0, le=100)  # a task whose worker died is run again (an actor restarted) this often

    def check(self):
        if self.address is not None and self.address not in ("auto", "local") and not RAY_ADDRESS.fullmatch(
                self.address):
            raise ConfigError(f"config key 'ray.address': expected auto, host:port or ray://host:port, got "
                              f"{show(self.address)}")


@dataclass(frozen=True)
class RunConfig:
    seed: int = setting(0, ge=0, le=MAX_INT)
    backend: str = setting("local", choices=("local", "ray"))
    workers: int = setting(1, ge=1, le=4096)  # local process pool size over shards
    strict: bool = False  # stop at the first bad sample instead of skipping it
    input: InputConfig = field(default_factory=InputConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    ray: RayConfig = field(default_factory=RayConfig)


RAY_ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}")  # host:port, ray://host:port (IPv6 in [])
MAX_CONFIG_BYTES = 1 << 20  # a YAML config file
MAX_SET_BYTES = 64 << 10  # one --set value
MAX_NODES, MAX_DEPTH = 100_000, 32  # values, and nesting, of a loaded config (alias bombs, recursive aliases)


def check_size(data: Any, where: str) -> None:
    """Refuse a loaded value with more than MAX_NODES values or nested deeper than MAX_DEPTH (an alias bomb
    or a recursive alias), before anything walks it whole."""
    budget = [MAX_NODES]

    def walk(node: Any, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(f"{where}: more than {MAX_NODES} values (a YAML alias bomb?)")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels (a recursive YAML alias?)")
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            walk(child, depth + 1)

    walk(data, 0)


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` bounded in size, values and depth. YAML 1.1 leaves ``1e-3`` a string; the parameter
    parser (``params.coerce``) reads it as the number a typed key expects."""
    limit = MAX_CONFIG_BYTES if "file" in where else MAX_SET_BYTES
    if len(text) > limit:
        raise ConfigError(f"{where}: {len(text)} characters is more than the {limit} allowed")
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deep") from None
    check_size(data, where)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {show(item)}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = safe_yaml(raw, f"--set {key.strip()[:200]}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: Mapping | None = None) -> RunConfig:
    """Read a YAML config (or start from ``base``/defaults), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = json.loads(json.dumps(base)) if base else {}
    if path is not None:
        text = read_config_file(path)
        try:
            loaded = safe_yaml(text, f"config file {path}")
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top, got {type(loaded).__name__}")
        data = _merge(data, loaded)
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {show(item)}: {show(part)} is not a section")
            node = nxt
        node[parts[-1]] = value
    return config_from_dict(data)


def read_config_file(path: str | Path) -> str:
    """A config file's text: a regular file (a FIFO would block, /dev/zero never end) of at most
    MAX_CONFIG_BYTES, in UTF-8."""
    try:
        if not Path(path).is_file():
            why = "not a regular file: a FIFO, a device or a folder" if Path(path).exists() else "no such file"
            raise ConfigError(f"config file {show(str(path))}: cannot read it ({why})")
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {show(str(path))}: cannot read it ({exc.__class__.__name__}: {exc})") from None


def _merge(a: dict, b: Mapping) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def absolute_paths(data: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """A copy of ``data`` (the fields of dataclass ``cls``, nested ones too) with each FILE value, and each
    FILE_OR_NAME value that is a path, absolute and normalised against the working directory; URLs are kept."""
    hints, out = typing.get_type_hints(cls, include_extras=True), dict(data)
    for f in dataclasses.fields(cls):
        value, kinds = out.get(f.name), _path_kinds(hints[f.name])
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, Mapping):
            out[f.name] = absolute_paths(value, hints[f.name])
        elif isinstance(value, str) and value and kinds and "://" not in value and ("file" in kinds or (
                os.path.exists(value) or value.startswith(("/", "./", "../", "~")))):
            out[f.name] = os.path.abspath(os.path.expanduser(value))
    return out


def _path_kinds(tp: Any) -> tuple:
    """The FILE / FILE_OR_NAME marks of an annotation (inside ``| None`` too)."""
    if typing.get_origin(tp) is Annotated:
        return tuple(m for m in tp.__metadata__ if m in ("file", "file or name"))
    return sum((_path_kinds(a) for a in typing.get_args(tp)), ())


def changed_keys(old: Any, new: dict, sections: tuple) -> list[str]:
    """The dotted keys of ``sections`` whose values differ between two config dicts."""
    old, out = old if isinstance(old, dict) else {}, []
    for sec in sections:
        a, b = old.get(sec), new.get(sec)
        out += ([f"{sec}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                if isinstance(a, dict) and isinstance(b, dict) else [sec] * (a != b))
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """The config from plain data (a loaded YAML, a stored config.json): every value checked (``parse_params``)."""
    return parse_params(RunConfig, data, "")
