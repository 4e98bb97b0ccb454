"""DataComp subset export: the kept samples' DataComp uids as the sorted u8,u8 array its resharder reads."""
from __future__ import annotations

import json
from collections import Counter
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..io.files import write_npy
from ..io.webdataset import iter_tar_samples
from .loaders import present_columns, read_manifest
from .reshard import input_path, kept_keys, run_shards
from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)


DATACOMP_UID = np.dtype("u8,u8")  # DataComp's resharder: 128-bit uid as (high 64 bits, low 64 bits), sorted


# ---------------------------------------------------------------- DataComp subset file
def datacomp_uid_array(hex_uids: pa.Array | list[str]) -> np.ndarray:
    """32-hex uids -> DataComp's sorted, unique ``np.dtype("u8,u8")`` array (high 64 bits, low 64 bits), the
    subset format its ``resharder.py --subset-file`` loads and binary-searches."""
    if isinstance(hex_uids, pa.ChunkedArray):
        hex_uids = hex_uids.combine_chunks()
    arr = hex_uids.cast(pa.string()) if isinstance(hex_uids, pa.Array) else pa.array(hex_uids, pa.string())
    ok = pc.fill_null(pc.match_substring_regex(arr, r"^[0-9a-fA-F]{32}$"), False)
    if not pc.all(ok).as_py() and len(arr):
        bad = arr.filter(pc.invert(ok))[0].as_py()
        raise InputError(f"{bad!r} is not a 32-hex DataComp uid")
    raw = np.frombuffer(bytes.fromhex("".join(arr.to_pylist())), dtype=">u8").reshape(-1, 2)
    out = np.empty(len(raw), DATACOMP_UID)
    out["f0"], out["f1"] = raw[:, 0], raw[:, 1]
    return np.unique(out)  # sorted (by high, then low word) and deduplicated


def _json_uids(run_dir: str | Path) -> list[str]:
    """The ``uid`` field of each kept sample's ``.json`` member, read from the original tars (runs made before
    the embed stage recorded it as ``source_uid``)."""
    out = []
    for shard in run_shards(run_dir):
        wanted = set(kept_keys(run_dir, shard["name"]))
        if not wanted:
            continue
        if shard["format"] != "webdataset":
            raise InputError(f"uid_source=json reads webdataset tars; shard {shard['name']} is {shard['format']}")
        for sample in iter_tar_samples(input_path(shard), shard["name"], Counter()):
            if sample["__key__"] in wanted:
                wanted.discard(sample["__key__"])
                try:
                    out.append(str(json.loads(sample["json"])["uid"]))
                except (KeyError, ValueError, TypeError):
                    raise InputError(f"shard {shard['name']}, key {sample['__key__']}: no .json with a 'uid' "
                                     "field") from None
                if not wanted:
                    break
        if wanted:
            raise InputError(f"shard {shard['name']}: {len(wanted)} kept samples are not in the tar")
    return out


def _has_source_uid(run_dir: str | Path) -> bool:
    return all("source_uid" in present_columns(run_dir, s["name"], ("source_uid",)) for s in run_shards(run_dir))


def _kept_source_uids(run_dir: str | Path) -> pa.Array:
    values = read_manifest(run_dir, True, ["source_uid"])["source_uid"].combine_chunks()
    if values.null_count:
        raise InputError(f"{values.null_count} kept samples have no source_uid (no 'uid' in their .json or id "
                         "column); choose --uid-source uid or key")
    return values


UID_SOURCES = ("auto", "uid", "key", "json")


def export_datacomp_uids(run_dir: str | Path, out_npy: str | Path, uid_source: str = "auto") -> dict:
    """Write the kept samples' DataComp uids as a sorted ``u8,u8`` .npy (DataComp ``resharder.py --subset-file``).

    ``auto`` and ``json`` take the manifest's ``source_uid`` column: the ``uid`` field of each sample's ``.json``
    (what DataComp's resharder reads) or the ``uid`` column of a metadata parquet, recorded by the embed stage
    (``json`` re-reads the tars for runs made without it). ``uid`` and ``key`` take those manifest columns as
    they are. ``auto`` never guesses from the shape of a key: without ``source_uid`` it stops and names the
    options."""
    if uid_source not in UID_SOURCES:
        raise ConfigError(f"uid_source must be one of {', '.join(UID_SOURCES)}, got {uid_source!r}")
    source = uid_source
    if uid_source in ("auto", "json") and _has_source_uid(run_dir):
        source, values = "source_uid", _kept_source_uids(run_dir)
    elif uid_source == "auto":
        raise InputError(f"{run_dir}: the manifest has no source_uid column (no sample .json or metadata parquet "
                         "held a 'uid'), so the DataComp uids are unknown; choose --uid-source json (the tars' "
                         ".json 'uid'), uid (the manifest uid) or key (the tar key) if that column holds them")
    elif uid_source == "json":
        values = _json_uids(run_dir)
    else:
        values = read_manifest(run_dir, True, [uid_source])[uid_source]
    try:
        uids = datacomp_uid_array(values)
    except ValueError as exc:
        raise InputError(f"{run_dir}: uid source {source}: {exc}") from None
    if len(uids) != len(values):
        log.warning("export-datacomp: %d kept samples share a uid; each uid is written once", len(values) - len(uids))
    write_npy(out_npy, uids)
    return {"uids": len(uids), "source": source, "path": str(out_npy)}
