"""Run configuration: frozen dataclasses loaded from YAML (safe_load) with dotted ``--set`` overrides."""
from __future__ import annotations

import dataclasses
from collections import abc
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class InputConfig:
    format: str = "auto"  # auto | webdataset | parquet | clip_retrieval | npy | datacomp (metadata .parquet + .npz)
    id_column: str = "uid"
    embedding_column: str = "embedding"
    label_column: str = "label"
    split_column: str = "split"
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    text_keys: tuple[str, ...] = ("txt", "json")
    label_key: str = "cls"
    npz_key: str = "l14_img"  # datacomp: which array of the .npz beside each metadata parquet is the embedding
    retries: int = 3  # a shard that cannot be reached (network, I/O) is tried again this many times ...
    retry_backoff_s: float = 1.0  # ... after waits of about this, doubling each time
    allow_failed_shards: bool = False  # go on without shards still unreachable after the retries


@dataclass(frozen=True)
class EmbedConfig:
    encoder: str = "open_clip"  # a key of datapruning.embed.ENCODERS
    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"  # open_clip tag or local checkpoint path
    model_config: str | None = None  # JSON file with a custom open_clip architecture
    allow_random_weights: bool = False  # never use random weights unless asked
    modality: str = "image"  # image | text
    module: str | None = None  # torch_module encoder: "package.module:ClassName"
    weights: str | None = None  # torch_module encoder: safetensors file
    batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda
    decode_workers: int = 2
    image_decode: str = "auto"  # auto (tensor on CUDA) | tensor (JPEG decode+resize as tensors, nvjpeg on CUDA) | pil
    store_dtype: str = "float32"  # float32 | float16 (on disk)


@dataclass(frozen=True)
class ClusterConfig:
    k: int = 100
    niter: int = 20
    fit_fraction: float | None = None  # None: k * max_points_per_centroid points
    max_points_per_centroid: int = 256
    fit_mib: int = 128  # a larger fit sample is kept on disk and read back each iteration (kmeans_stream)
    backend: str = "auto"  # auto | faiss | faiss-gpu | torch
    assign_batch: int = 65536
    partition: bool = True  # also write the embeddings grouped by cluster (per-cluster metrics need it)
    partition_mib: int = 256  # float32 embedding bytes per group of clusters (a per-cluster unit of work)


@dataclass(frozen=True)
class ScoreConfig:
    metrics: tuple[str, ...] = ("ssp", "random")
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SelectConfig:
    method: str = "rank"  # a key of datapruning.select.SELECTORS
    metric: str | None = None  # the score a selector ranks by (each selector has its default)
    mode: str = "hard"  # hard | easy | random
    keep_fraction: float | None = 0.5
    keep_count: int | None = None
    min_per_cluster: float = 0.0  # minimum share of the budget spread over clusters
    min_per_label: float = 0.0
    dedup_eps: float | None = None  # SemDeDup filter before selection, by eps ...
    dedup_keep_fraction: float | None = None  # ... or by the kept fraction it should reach
    params: Mapping[str, Any] = field(default_factory=dict)  # selector-specific (tau, l, beta, ...)


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local instance; "auto", "host:6379" or "ray://host:10001"
    num_cpus: int | None = None
    embed_gpus: float = 1.0  # GPUs per embedding actor when CUDA is present
    retries: int = 3  # a task whose worker died is run again (an actor restarted) this many times


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    backend: str = "local"  # local | ray
    workers: int = 1  # local process pool size over shards
    strict: bool = False  # stop at the first bad sample instead of skipping it
    input: InputConfig = field(default_factory=InputConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    ray: RayConfig = field(default_factory=RayConfig)


CHOICES = {
    "backend": ("local", "ray"),
    "input.format": ("auto", "webdataset", "parquet", "clip_retrieval", "npy", "datacomp"),
    "input.npz_key": ("l14_img", "b32_img", "l14_txt", "b32_txt"),
    "embed.modality": ("image", "text"),
    "embed.device": ("auto", "cpu", "cuda"),
    "embed.image_decode": ("auto", "tensor", "pil"),
    "embed.store_dtype": ("float32", "float16"),
    "cluster.backend": ("auto", "faiss", "faiss-gpu", "torch"),
    "select.mode": ("hard", "easy", "random"),
}
POSITIVE = ("workers", "embed.batch_size", "cluster.k", "cluster.niter", "cluster.max_points_per_centroid",
            "cluster.fit_mib", "cluster.assign_batch", "cluster.partition_mib")
FRACTIONS = ("cluster.fit_fraction", "select.keep_fraction", "select.min_per_cluster", "select.min_per_label",
             "select.dedup_keep_fraction")


RAY_ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}")  # host:port, ray://host:port (IPv6 in [])
MAX_CONFIG_BYTES = 1 << 20  # a YAML config file
MAX_SET_BYTES = 64 << 10  # one --set value
MAX_NODES, MAX_DEPTH = 100_000, 32  # values, and nesting, of a loaded config (alias bombs, recursive aliases)
MAX_INT = 2 ** 31 - 1  # faiss and torch take these as C ints
BOUNDS = {"seed": (0, MAX_INT), "workers": (1, 4096), "cluster.k": (1, 10_000_000), "cluster.niter": (1, 100_000),
          "input.retries": (0, 100), "input.retry_backoff_s": (0.0, 600.0), "ray.retries": (0, 100),
          "ray.embed_gpus": (1e-3, 1024.0)}


def show(value: Any) -> str:
    """A value for an error message: its repr, at most 200 characters (recursive and huge values too)."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = 200
    short.maxlevel = 4
    text = short.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number: YAML 1.2's float spelling, which YAML 1.1 (PyYAML's)
    takes for a string, so ``keep_fraction: 1e-3`` failed as "expected a number, got '1e-3'"."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` (with ``_Loader``) bounded in size, values and depth."""
    limit = MAX_CONFIG_BYTES if "file" in where else MAX_SET_BYTES
    if len(text) > limit:
        raise ConfigError(f"{where}: {len(text)} characters is more than the {limit} allowed")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deep") from None
    check_size(data, where)
    return data


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``, converting lists to tuples; name ``key`` on error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {show(value)}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin in (Mapping, abc.Mapping, dict) or tp is Mapping:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {show(value)}")
        inner = args[1] if len(args) == 2 else Any
        for name, item in value.items():
            if typing.get_origin(inner) in (Mapping, abc.Mapping) and not isinstance(item, Mapping):
                raise ConfigError(f"config key {key + '.' + str(name)!r}: expected a mapping of parameters, "
                                  f"got {show(item)}")
        try:
            return json.loads(json.dumps(value))  # plain, JSON-able, detached copy
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config key {key!r}: not plain data ({exc})") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {show(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"config key {key!r}: {show(value)} is too large") from None
        if value != value:
            raise ConfigError(f"config key {key!r}: expected a number, got nan")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {show(value)}")
        return value
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'!r}: expected a mapping, got {show(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {show(prefix + str(unknown[0]))}; known keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key, tp = prefix + name, hints[name]
        kwargs[name] = _build(tp, value, key + ".") if dataclasses.is_dataclass(tp) else _coerce(value, tp, key)
    return cls(**kwargs)


def _validate(cfg: RunConfig) -> None:
    flat = to_dict(cfg)
    def get(key):
        node = flat
        for part in key.split("."):
            node = node[part]
        return node
    for key, options in CHOICES.items():
        if get(key) not in options:
            raise ConfigError(f"config key {key!r}: expected one of {list(options)}, got {show(get(key))}")
    for key in POSITIVE:
        if not 1 <= get(key) <= MAX_INT:
            raise ConfigError(f"config key {key!r}: must be {'>= 1' if get(key) < 1 else f'<= {MAX_INT}'}, "
                              f"got {show(get(key))}")
    for key, (lo, hi) in BOUNDS.items():
        if not lo <= get(key) <= hi:
            raise ConfigError(f"config key {key!r}: must be in [{lo}, {hi}], got {show(get(key))}")
    for key in FRACTIONS:
        value = get(key)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key {key!r}: must be in [0, 1], got {value}")
    if cfg.select.keep_count is not None and cfg.select.keep_count < 0:
        raise ConfigError(f"config key 'select.keep_count': must be >= 0, got {cfg.select.keep_count}")
    if cfg.select.dedup_eps is not None and not 0.0 <= cfg.select.dedup_eps <= 2.0:
        raise ConfigError(f"config key 'select.dedup_eps': must be in [0, 2], got {cfg.select.dedup_eps}")
    if cfg.ray.num_cpus is not None and not 1 <= cfg.ray.num_cpus <= 65536:  # 0 CPUs: every task waits forever
        raise ConfigError(f"config key 'ray.num_cpus': must be >= 1 (or null: all of them), got {cfg.ray.num_cpus}")
    address = cfg.ray.address
    if address is not None and address not in ("auto", "local") and not RAY_ADDRESS.fullmatch(address):
        raise ConfigError(f"config key 'ray.address': expected auto, host:port or ray://host:port, got {show(address)}")


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
    cfg = _build(RunConfig, data)
    _validate(cfg)
    return cfg


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
    cfg = _build(RunConfig, data)
    _validate(cfg)
    return cfg


def typed_params(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls(**values)`` for a metric's or selector's parameter dataclass, then its ``check()``; a wrong or
    missing value fails as a ConfigError naming ``where``."""
    try:
        params = cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {str(exc)[:300]}") from None
    check = getattr(params, "check", None)
    if check is not None:
        check()
    return params
