"""Feed a run's manifest to trainers: webdataset filter, PyTorch dataset, HF/pandas/pyarrow tables.

Also stored embeddings and cached teacher outputs. The DataComp subset export is ``consumers.datacomp``.
"""
from __future__ import annotations

import logging
import os
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Callable, Collection, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import ConfigError, InputError, RunNotReady, UidNotFound, require
from ..io.files import is_done, read_json
from ..io.shards import shard_names
from ..io.webdataset import iter_tar_samples
from .reshard import input_path, kept_keys, manifest_shard, run_shards
from ..run import RunLayout

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- tables: pyarrow, pandas, Hugging Face datasets
def manifest_files(run_dir: str | Path) -> list[str]:
    layout = RunLayout(run_dir)
    return [str(layout.shard_file("manifest", s["name"])) for s in run_shards(run_dir)]


def read_manifest(run_dir: str | Path, kept_only: bool = False, columns=None) -> pa.Table:
    """The manifest as one pyarrow Table (shard order); ``kept_only`` filters while reading."""
    dataset = pds.dataset(manifest_files(run_dir), format="parquet")
    return dataset.to_table(columns=columns, filter=(pds.field("keep") == True) if kept_only else None)  # noqa: E712


def manifest_dataframe(run_dir: str | Path, kept_only: bool = False, columns=None):
    """The manifest as a pandas DataFrame."""
    return read_manifest(run_dir, kept_only, columns).to_pandas()


def load_manifest_hf(run_dir: str | Path, kept_only: bool = False, columns=None, cache_dir: str | None = None):
    """The manifest as a Hugging Face ``datasets.Dataset`` (memory-mapped Arrow, built by ``Dataset.from_parquet``)."""
    datasets = require("datasets", "hf", "load_manifest_hf")
    return datasets.Dataset.from_parquet(manifest_files(run_dir), columns=list(columns) if columns else None,
                                         filters=[("keep", "==", True)] if kept_only else None, cache_dir=cache_dir)


def load_embeddings(run_dir: str | Path, select: str | Collection[str] = "kept") -> dict:
    """Stored embeddings of the selected samples: {"uid": [n] object, "embedding": [n, d] float32, "label": list}."""
    from ..io.tables import column_to_matrix

    select = _as_selection(select)
    uids, mats, labels = [], [], []
    for shard in run_shards(run_dir):
        path = RunLayout(run_dir).shard_file("embed", shard["name"])
        emb = pds.dataset(str(path)).to_table(columns=["uid", "embedding"])
        man = manifest_shard(run_dir, shard["name"], present_columns(run_dir, shard["name"], ("uid", "keep", "label")))
        if not emb["uid"].equals(man["uid"]):
            raise RunNotReady(f"{path}: rows do not match manifest/{shard['name']}.parquet by uid; rerun the run")
        mask = _selection(man, select)
        uids.extend(np.asarray(man["uid"].to_pylist(), dtype=object)[mask])
        mats.append(column_to_matrix(emb["embedding"], str(path))[mask])
        labels.extend(np.asarray(man["label"].to_pylist() if "label" in man.column_names else [None] * len(mask),
                                 dtype=object)[mask])
    _check_found(select, uids)
    return {"uid": np.asarray(uids, dtype=object), "embedding": np.concatenate(mats) if mats else np.zeros((0, 0)),
            "label": labels}


def present_columns(run_dir, shard: str, columns) -> tuple:
    names = pq.read_schema(RunLayout(run_dir).shard_file("manifest", shard)).names
    return tuple(c for c in columns if c in names)


def _as_selection(select) -> str | frozenset:
    if isinstance(select, str):
        if select not in ("kept", "all"):
            raise ConfigError(f"select must be 'kept', 'all' or a collection of uids, got {select!r}")
        return select
    return frozenset(select)


def _selection(man: pa.Table, select: str | frozenset) -> np.ndarray:
    """Boolean mask of the manifest rows chosen by ``select`` ('kept', 'all' or a set of uids)."""
    if select == "kept":
        return man["keep"].to_numpy(zero_copy_only=False).astype(bool)
    if select == "all":
        return np.ones(man.num_rows, bool)
    return np.fromiter((u in select for u in man["uid"].to_pylist()), dtype=bool, count=man.num_rows)


def _check_found(select, found) -> None:
    if not isinstance(select, str) and len(found) != len(select):
        missing = sorted(select - set(found))
        raise UidNotFound(f"{len(missing)} selected uids are not in the manifest (first {missing[0]!r})")


# ---------------------------------------------------------------- streaming filter for plain webdataset pipelines
class KeptFilter:
    """``wds.WebDataset(urls, shardshuffle=False).select(KeptFilter(run_dir))``: True for the samples the run kept.

    Each sample's ``__url__`` is mapped to the run's shard name (by path, else by file stem) and that shard's kept
    keys are loaded when the shard is first seen: memory holds a few shards' keys, never the dataset's. Nothing is
    copied. Picklable, so it works inside DataLoader workers."""

    def __init__(self, run_dir: str | Path, cache_shards: int = 4):
        self.run_dir = str(run_dir)
        shards = run_shards(run_dir)
        self.by_path = {_norm(s["path"]): s["name"] for s in shards}
        self.names = frozenset(s["name"] for s in shards)
        self.cache_shards = cache_shards
        self._cache: OrderedDict[str, frozenset] = OrderedDict()

    def shard_of(self, url: str) -> str:
        name = self.by_path.get(_norm(url))
        if name is not None:
            return name
        for token in [url, *reversed(url.split())]:  # a moved folder, or "pipe:aws s3 cp s3://b/00001.tar -"
            stem = shard_names([token])[0]
            if stem in self.names:
                return stem
        raise InputError(f"{url}: not one of the shards of run {self.run_dir} (see its shards.json)")

    def keys(self, shard: str) -> frozenset:
        if shard not in self._cache:
            self._cache[shard] = frozenset(kept_keys(self.run_dir, shard))
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return self._cache[shard]

    def __call__(self, sample: dict) -> bool:
        return sample["__key__"] in self.keys(self.shard_of(sample["__url__"]))

    def __getstate__(self):
        return {**self.__dict__, "_cache": OrderedDict()}


class keep_only:  # noqa: N801 - used like webdataset's stage functions: .compose(keep_only(run_dir))
    """Pipeline stage (iterator of samples -> kept samples) for ``.compose(...)`` or ``wds.DataPipeline(...)``."""

    def __init__(self, run_dir: str | Path):
        self.keep = KeptFilter(run_dir)

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        return (s for s in samples if self.keep(s))


def kept_urls(run_dir: str | Path) -> list[str]:
    """The original shard paths holding at least one kept sample (the others need not be read at all)."""
    return [input_path(s) for s in run_shards(run_dir)
            if pc.any(manifest_shard(run_dir, s["name"], ("keep",))["keep"]).as_py()]


def _norm(url: str) -> str:
    url = url[len("file://"):] if url.startswith("file://") else url
    return url if "://" in url or url.startswith("pipe:") else os.path.realpath(url)


# ---------------------------------------------------------------- PyTorch IterableDataset
class ManifestDataset(IterableDataset):
    """The selected samples (default: kept) read from the run's original webdataset shards.

    Each sample is the webdataset dict (``__key__`` and raw member bytes by extension) plus ``uid``, ``shard``,
    the manifest ``columns`` (default: label and split where present) and, with ``teacher=True``, the cached
    teacher arrays as ``teacher_<name>`` (``teacher_logits`` float16 [C], or ``teacher_topk_values``,
    ``teacher_topk_indices`` and ``teacher_tail_lse`` for a top-k teacher). With ``decode=None``,
    ``transform(sample)`` maps that dict to what you want. With ``decode="pil"`` (RGB) or ``"tensor"`` (uint8
    [3, H, W]) the raw members are replaced by ``image`` = ``transform(decoded image)`` (an open_clip or
    torchvision transform plugs in) and ``text`` (the caption, when there is one), so the default collate batches it.
    Shards are split over DataLoader workers and distributed ranks (rank-major), so every selected sample is
    read exactly once per epoch. ``shuffle_shards`` reorders shards per ``set_epoch`` (same order in all workers).
    """

    def __init__(self, run_dir: str | Path, select: str | Collection[str] = "kept", columns=None,
                 teacher: bool = False, transform: Callable | None = None, shuffle_shards: bool = False, seed: int = 0,
                 decode: str | None = None):
        from ..run import load_run_config

        if decode not in DECODE:
            raise ConfigError(f"decode must be one of {list(DECODE)}, got {decode!r}")
        self.run_dir, self.decode = str(run_dir), decode
        self.keys = load_run_config(Path(run_dir)).input if decode else None  # image_keys, text_keys
        shards = run_shards(run_dir)
        bad = [s for s in shards if s["format"] != "webdataset"]
        if bad:
            raise RunNotReady(f"{run_dir}: ManifestDataset reads webdataset tars, the input is {bad[0]['format']}; "
                              "use load_embeddings() or read_manifest() for precomputed inputs")
        self.select, self.teacher, self.transform = _as_selection(select), teacher, transform
        self.shuffle_shards, self.seed, self.epoch = shuffle_shards, seed, 0
        self.columns = tuple(columns) if columns is not None else None
        self.plan = []
        for shard in shards:
            n = int(self._rows(shard["name"]).num_rows)
            if n:
                self.plan.append((shard, n))
        self.num_samples = sum(n for _, n in self.plan)
        if not isinstance(self.select, str) and self.num_samples != len(self.select):
            raise UidNotFound(f"{len(self.select) - self.num_samples} selected uids are not in the manifest of {run_dir}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self, shard: str) -> pa.Table:
        cols = self.columns if self.columns is not None else present_columns(self.run_dir, shard, ("label", "split"))
        table = manifest_shard(self.run_dir, shard, ("uid", "key", "keep", *cols))
        return table.filter(pa.array(_selection(table, self.select)))

    def my_shards(self) -> list[dict]:
        shards = [s for s, _ in self.plan]
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        rank, world = _dist()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return shards[rank * nw + wid::world * nw]

    def __iter__(self) -> Iterator:
        for shard in self.my_shards():
            yield from self._iter_shard(shard)

    def _iter_shard(self, shard: dict) -> Iterator:
        rows = self._rows(shard["name"])
        index = {k: i for i, k in enumerate(rows["key"].to_pylist())}
        uids = rows["uid"].to_pylist()
        extra = {c: rows[c].to_pylist() for c in rows.column_names if c not in ("uid", "key", "keep")}
        teacher = _teacher_rows(self.run_dir, shard["name"], uids) if self.teacher else {}
        for sample in iter_tar_samples(input_path(shard), shard["name"], Counter()):
            i = index.pop(sample["__key__"], None)
            if i is None:
                continue
            sample.update(uid=uids[i], shard=shard["name"], **{c: v[i] for c, v in extra.items()})
            sample.update({f"teacher_{c}": a[i] for c, a in teacher.items()})
            yield self._finish(sample)
            if not index:
                break  # every selected sample found: the rest of the tar is not read
        if index:
            raise InputError(f"shard {shard['name']} ({shard['path']}): {len(index)} selected samples are not in the "
                             f"tar (first key {next(iter(index))!r}); did the shard change since the run?")


    def _finish(self, sample: dict):
        if self.decode is None:
            return self.transform(sample) if self.transform is not None else sample
        from ..embed import decode_input
        from ..embed.samples import caption

        image = decode_input(sample, "image", self.keys.image_keys, ())
        if self.decode == "tensor":
            from torchvision.transforms.functional import pil_to_tensor

            image = pil_to_tensor(image)
        out = {k: v for k, v in sample.items() if not isinstance(v, bytes)}
        out["image"] = self.transform(image) if self.transform is not None else image
        text = caption(sample, self.keys.text_keys)
        if text is not None:
            out["text"] = text
        return out


DECODE = (None, "pil", "tensor")


def _teacher_rows(run_dir: str, shard: str, uids: list[str]) -> dict[str, np.ndarray]:
    tu, arrays = read_teacher_shard(run_dir, shard)
    pos = {u: j for j, u in enumerate(tu)}
    missing = [u for u in uids if u not in pos]
    if missing:
        raise UidNotFound(f"no teacher output for uid {missing[0]!r} ({len(missing)} in shard {shard}); "
                       "rerun 'datapruning teacher' (with --all for samples the run did not keep)")
    rows = [pos[u] for u in uids]
    return {c: a[rows] for c, a in arrays.items()}


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------- cached teacher outputs (datapruning teacher)
def teacher_info(run_dir: str | Path) -> dict:
    """The teacher's info: its name, classes (class i = classes[i]), num_classes, format, top_k, samples."""
    path = RunLayout(run_dir).check().teacher_info
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no teacher outputs; run 'datapruning teacher {run_dir} ...' first")
    info = read_json(path)
    info.setdefault("format", "topk")  # outputs written before full logits were the default
    return info


TEACHER_COLUMNS = {"full": ("logits",), "topk": ("topk_values", "topk_indices", "tail_lse")}


def _matrix(table: pa.Table, col: str) -> np.ndarray:
    width = table.schema.field(col).type.list_size
    dtype = table.schema.field(col).type.value_type.to_pandas_dtype()
    if table.num_rows == 0:
        return np.zeros((0, width), dtype)
    return table[col].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def read_teacher_shard(run_dir: str | Path, shard: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """(uids, arrays) of one shard. Full logits: {"logits": float16 [m, C]}; top-k: {"topk_values": float16
    [m, k], "topk_indices": int32 [m, k], "tail_lse": float32 [m, temperatures]} (no tail_lse in older outputs)."""
    path = RunLayout(run_dir).shard_file("teacher", shard)
    if not is_done(path.parent, shard):
        raise FileNotFoundError(f"{path}: teacher outputs missing; run 'datapruning teacher {run_dir} ...' first")
    table = pq.read_table(path)
    names = TEACHER_COLUMNS["full" if "logits" in table.column_names else "topk"]
    return table["uid"].to_pylist(), {c: _matrix(table, c) for c in names if c in table.column_names}


def load_teacher(run_dir: str | Path, uids) -> dict[str, np.ndarray]:
    """The teacher arrays (see ``read_teacher_shard``) aligned to ``uids``; every uid must have outputs.
    ``datapruning.consumers.kd.teacher_batch(*torch tensors of the values)`` makes ``kd_loss``'s teacher."""
    info = teacher_info(run_dir)
    pos, parts, base = {}, [], 0
    for shard in run_shards(run_dir):
        su, arrays = read_teacher_shard(run_dir, shard["name"])
        if su:
            pos.update((u, base + j) for j, u in enumerate(su))
            parts.append(arrays)
            base += len(su)
    missing = [u for u in uids if u not in pos]
    if missing:
        raise UidNotFound(f"no teacher output for uid {missing[0]!r} ({len(missing)} missing); the teacher outputs "
                       f"cover the {info['samples']} samples: rerun 'datapruning teacher' (--all for every sample)")
    rows = np.fromiter((pos[u] for u in uids), dtype=np.int64, count=len(uids))
    if not parts:
        return {c: np.zeros((0, 0), np.float32) for c in TEACHER_COLUMNS[info["format"]]}
    return {c: np.concatenate([p[c] for p in parts])[rows] for c in parts[0]}
