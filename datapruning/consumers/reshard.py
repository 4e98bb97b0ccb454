"""Reshard: copy a run's kept samples into new webdataset tars (fixed size, deterministic names, exact bytes)."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
from concurrent.futures import as_completed
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from ..errors import ConfigError, InputError, RunNotReady, StageError, TruncatedShard, WriteFailed
from ..exec import process_pool
from ..io.files import META, atomic_path, clean_stage, clean_temp, done_path, is_done, mark_done, read_json, write_json
from ..io.lock import LOCK_NAME, check_idle, locked
from ..io.webdataset import SHARD_DAMAGE, Member, iter_tar_groups
from ..run import RunLayout

log = logging.getLogger(__name__)

NAME_FORMAT = "{:08d}"  # DataComp / img2dataset style: 00000000.tar plus 00000000_stats.json ("successes": n)
TAR_FORMAT = tarfile.PAX_FORMAT
SIZES = "sizes.json"  # {shard file name: samples}: what open_clip's get_wds_dataset and DataComp's resharder read
PIECES = ".pieces"  # boundary pieces of output shards that span input shards; removed when the reshard completes


# ---------------------------------------------------------------- reading a finished run (light: no torch here)
def run_shards(run_dir: str | Path) -> list[dict]:
    """The run's input shards (path, name, format), in order; checks the manifest stage finished for each."""
    layout = RunLayout(run_dir)
    if not layout.shards.exists():
        raise RunNotReady(f"{run_dir}: no shards.json; is this a run folder made by 'datapruning run'?")
    shards = layout.read_shards()
    missing = [s["name"] for s in shards if not is_done(layout.dir("manifest"), s["name"])]
    if missing:
        raise RunNotReady(f"{run_dir}: manifest of shard {missing[0]} is not finished "
                          f"({len(missing)} of {len(shards)}); run 'datapruning manifest --output {run_dir}'")
    return shards


def input_path(shard: dict, run_dir: Path | None = None) -> str:
    """The shard's input location from shards.json; a local file that is gone, or one that changed since the
    run embedded it (size, mtime), is an error naming it."""
    from ..io.shards import input_change
    from ..run import STAGE_DIRS

    path = shard["path"]
    if "://" not in path and not os.path.exists(path):
        raise InputError(f"shard {shard['name']}: input file {path} is missing (moved or deleted since the run?); "
                         "put it back or edit the run's shards.json")
    marker = done_path(Path(run_dir) / STAGE_DIRS["embed"], shard["name"]) if run_dir is not None else None
    if marker is not None and marker.exists() and (why := input_change(path, read_json(marker).get("input"))):
        raise InputError(f"shard {shard['name']}: input file {path} changed since the run read it ({why}); rerun "
                         f"'datapruning run' on it first")
    return path


def manifest_shard(run_dir: str | Path, shard: str, columns=("key", "keep")):
    """One shard's manifest rows (pyarrow Table), in the input's order."""
    path = RunLayout(run_dir).shard_file("manifest", shard)
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise RunNotReady(f"{path}: no column {missing[0]!r} (have {names})")
    return pq.read_table(path, columns=list(columns))


def kept_keys(run_dir: str | Path, shard: str) -> list[str]:
    """The ``__key__`` of every kept sample of ``shard``, in tar order."""
    table = manifest_shard(run_dir, shard)
    return [k for k, keep in zip(table["key"].to_pylist(), table["keep"].to_pylist()) if keep]


# ---------------------------------------------------------------- reading tar samples with their raw members
def raw_samples(path: str, shard: str) -> Iterator[tuple[str, list[Member]]]:
    """Yield (key, [(suffix, tarinfo, bytes)...]) per sample, suffix case kept, grouped by the embed stage's
    reader. Unsafe members raise UnsafeMember, a damaged tar TruncatedShard; repeats were counted by the embed
    stage already, so the first copy is kept quietly."""
    def on_skip(reason: str, key: str | None, detail: str) -> None:
        if reason in SHARD_DAMAGE:
            raise TruncatedShard(f"shard {shard} ({path}): unreadable tar ({detail})")

    return iter_tar_groups(path, shard, on_skip, safe=True)


# ---------------------------------------------------------------- writing
def out_name(index: int, name_format: str = NAME_FORMAT) -> str:
    return name_format.format(index)


def stats_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}_stats.json"


class _ShardWriter:
    """One output tar (or piece) written through an atomic temporary file; ``close`` returns the data end offset.
    A failed write (disk full) raises WriteFailed naming the output tar; ``abort`` removes the temporary file."""

    def __init__(self, path: Path):
        self.path = path
        self._ctx = atomic_path(path)
        self._tmp = self._ctx.__enter__()
        self.tar = tarfile.open(self._tmp, "w", format=TAR_FORMAT)
        self.count, self.sources = 0, {}

    def add(self, key: str, members, source: str) -> None:
        for suffix, info, data in members:
            new = tarfile.TarInfo(f"{key}.{suffix}")
            new.size, new.mtime, new.mode = len(data), info.mtime, info.mode
            try:
                self.tar.addfile(new, io.BytesIO(data))
            except OSError as exc:
                raise WriteFailed(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self.count += 1
        self.sources[source] = self.sources.get(source, 0) + 1

    def close(self) -> int:
        data_end = self.tar.offset
        try:
            self.tar.close()  # writes the end blocks: a full disk can fail here too
        except OSError as exc:
            raise WriteFailed(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self._ctx.__exit__(None, None, None)
        return data_end

    def abort(self) -> None:
        """Remove the temporary tar; the caller re-raises what stopped it (a read error stays a read error)."""
        try:
            self.tar.close()
        except OSError:
            pass
        stop = GeneratorExit()
        self._ctx.__exit__(GeneratorExit, stop, None)  # atomic_path removes its temporary file


def write_stats(out_dir: Path, name: str, count: int, sources: dict) -> None:
    """Written last: the output shard's stats json doubles as its done marker."""
    write_json(stats_path(out_dir, name), {"successes": count, "count": count, "sources": sources,
                                           "bytes": (out_dir / f"{name}.tar").stat().st_size})


def reshard_one(task: dict) -> dict:
    """Copy one input shard's kept samples: whole output shards go straight to their final name, the parts of
    output shards shared with a neighbouring input shard go to pieces. Returns the pieces written."""
    out_dir, name, n = Path(task["out_dir"]), task["name"], task["per_shard"]
    wanted = {k: task["offset"] + i for i, k in enumerate(task["keys"])}
    pieces, writer, current, found, damage = {}, None, None, 0, ""
    try:
        try:
            for key, members in raw_samples(task["path"], name):
                if key not in wanted:
                    continue
                j = wanted[key] // n
                if j != current:
                    _finish(writer, current, task, pieces)
                    writer, current = _open_writer(j, task), j
                found += 1
                if writer is not None:
                    writer.add(task["uid_prefix"] + key if task["uid_keys"] else key, members, name)
        except TruncatedShard as exc:  # fine if every kept sample came before the damage (the run skipped the rest)
            damage = f" ({exc})"
            log.warning("%s", exc)
        if found != len(wanted):
            raise InputError(f"shard {name} ({task['path']}): {len(wanted) - found} kept samples are not in the "
                             f"tar; did the shard change since the run?{damage}")
        _finish(writer, current, task, pieces)
        writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    info = {"shard": name, "kept": found, "pieces": pieces}
    mark_done(out_dir / PIECES, name, info)
    return info


def _whole(j: int, task: dict) -> bool:
    start, stop = j * task["per_shard"], min((j + 1) * task["per_shard"], task["total"])
    return start >= task["offset"] and stop <= task["offset"] + len(task["keys"])


def _open_writer(j: int, task: dict):
    out_dir, name = Path(task["out_dir"]), out_name(j, task["name_format"])
    if _whole(j, task):
        return None if stats_path(out_dir, name).exists() else _ShardWriter(out_dir / f"{name}.tar")
    return _ShardWriter(out_dir / PIECES / f"{name}-{task['index']:06d}.tar")


def _finish(writer, j, task: dict, pieces: dict) -> None:
    if writer is None:
        return
    data_end = writer.close()
    out_dir, name = Path(task["out_dir"]), out_name(j, task["name_format"])
    if _whole(j, task):
        write_stats(out_dir, name, writer.count, writer.sources)
    else:
        pieces[str(j)] = {"file": f"{name}-{task['index']:06d}.tar", "data_end": data_end,
                          "count": writer.count, "sources": writer.sources}


def assemble(out_dir: Path, j: int, parts: list[dict], name_format: str) -> None:
    """Concatenate the pieces of output shard ``j`` (their member blocks, in input order) into one tar."""
    name = out_name(j, name_format)
    with atomic_path(out_dir / f"{name}.tar") as tmp, open(tmp, "wb") as dst:
        for part in parts:
            with open(out_dir / PIECES / part["file"], "rb") as src:
                _copy_exact(src, dst, part["data_end"])
        end = dst.tell() + 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks, padded to a record as tarfile does
        dst.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE))
    sources: dict[str, int] = {}
    for part in parts:
        for src_name, c in part["sources"].items():
            sources[src_name] = sources.get(src_name, 0) + c
    write_stats(out_dir, name, sum(p["count"] for p in parts), sources)


def _copy_exact(src, dst, length: int) -> None:
    while length > 0:
        chunk = src.read(min(length, 1 << 20))
        if not chunk:
            raise InputError(f"{src.name}: piece is shorter than recorded; delete its folder and rerun")
        dst.write(chunk)
        length -= len(chunk)


# ---------------------------------------------------------------- the job
def plan_tasks(run_dir: Path, out_dir: Path, per_shard: int, uid_keys: bool, name_format: str):
    """Kept keys per input shard with their global offsets, and a digest naming the whole plan."""
    tasks, offset, digest = [], 0, hashlib.sha256()
    for index, shard in enumerate(run_shards(run_dir)):
        if shard["format"] != "webdataset":
            raise RunNotReady(f"{run_dir}: reshard copies webdataset tars; this run's input is {shard['format']}")
        keys = kept_keys(run_dir, shard["name"])
        digest.update(f"{shard['path']}\0{shard['name']}\0{len(keys)}\0".encode() + "\0".join(keys).encode())
        if keys:
            tasks.append({"path": input_path(shard, run_dir), "name": shard["name"], "index": index, "keys": keys,
                          "offset": offset, "uid_prefix": f"{shard['name']}/"})
        offset += len(keys)
    for t in tasks:
        t.update(total=offset, per_shard=per_shard, out_dir=str(out_dir), uid_keys=uid_keys, name_format=name_format)
    digest.update(f"{per_shard}\0{uid_keys}\0{name_format}".encode())
    return tasks, offset, digest.hexdigest()[:16]


def _check_original_keys(tasks: list[dict], per_shard: int) -> None:
    seen: dict[int, dict[str, str]] = {}
    for t in tasks:
        for i, key in enumerate(t["keys"]):
            bucket = seen.setdefault((t["offset"] + i) // per_shard, {})
            if key in bucket:
                raise InputError(f"key {key!r} of shard {t['name']} repeats one of shard {bucket[key]} in the same "
                                 "output shard; use keys='uid' (--keys uid), which keeps keys unique")
            bucket[key] = t["name"]


def reshard(run_dir: str | Path, output: str | Path, samples_per_shard: int, workers: int = 1,
            keys: str = "uid", name_format: str = NAME_FORMAT) -> dict:
    """Write the kept samples of ``run_dir`` as webdataset tars in ``output``: ``samples_per_shard`` per tar (the
    last one may hold fewer), in input order, named 00000000.tar, 00000001.tar, ... each with a ``_stats.json``,
    and ``sizes.json`` ({tar name: samples}) for open_clip and DataComp.
    ``keys='uid'`` names each sample by its manifest uid (``<shard>/<key>``, unique); ``'original'`` keeps the
    input ``__key__``. Every member's bytes are copied unchanged. A rerun resumes; a different plan is refused."""
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if keys not in ("uid", "original"):
        raise ConfigError(f"keys must be 'uid' or 'original', got {keys!r}")
    run_dir, out_dir = RunLayout(run_dir).root, Path(os.path.abspath(output))  # absolute, no ".." left
    check_idle(run_dir)  # a run writing the folder now would change the kept set under us
    with locked(out_dir):  # one writer per output folder: two reshards into one would remove each other's files
        return _reshard(run_dir, out_dir, samples_per_shard, workers, keys, name_format)


def _reshard(run_dir: Path, out_dir: Path, samples_per_shard: int, workers: int, keys: str, name_format: str) -> dict:
    tasks, total, digest = plan_tasks(run_dir, out_dir, samples_per_shard, keys == "uid", name_format)
    if keys == "original":
        _check_original_keys(tasks, samples_per_shard)
    if _claim_output(out_dir, run_dir, digest, samples_per_shard, keys):
        return read_json(out_dir / "_reshard.json")  # finished before: nothing to do
    todo = [t for t in tasks if not is_done(out_dir / PIECES, t["name"])]
    (out_dir / PIECES).mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, out_dir / PIECES):  # full-size temporary tars of a killed reshard
        clean_temp(folder)
    _run_tasks(todo, workers)
    n_out = -(-total // samples_per_shard)
    parts: dict[int, list[dict]] = {}
    for t in tasks:  # input order, so pieces concatenate in sample order
        for j, piece in read_json(done_path(out_dir / PIECES, t["name"]))["pieces"].items():
            parts.setdefault(int(j), []).append(piece)
    for j, pieces in sorted(parts.items()):
        if not stats_path(out_dir, out_name(j, name_format)).exists():
            assemble(out_dir, j, pieces, name_format)
    names = [out_name(j, name_format) for j in range(n_out)]
    missing = [n for n in names if not stats_path(out_dir, n).exists()]
    if missing:
        raise StageError(f"{out_dir}: output shard {missing[0]} was not written; rerun to resume")
    clean_stage(out_dir / PIECES)
    shutil.rmtree(out_dir / META, ignore_errors=True)
    write_json(out_dir / SIZES, {f"{n}.tar": read_json(stats_path(out_dir, n))["count"] for n in names})
    summary = {"run": str(run_dir), "plan": digest, "samples_per_shard": samples_per_shard, "keys": keys,
               "samples": total, "shards": [f"{n}.tar" for n in names], "complete": True,
               "pattern": _pattern(out_dir, names)}
    write_json(out_dir / "_reshard.json", summary)
    log.info("reshard: %d samples in %d shards: %s", total, len(names), summary["pattern"])
    return summary


def _claim_output(out_dir: Path, run_dir: Path, digest: str, per_shard: int, keys: str) -> bool:
    """Mark ``out_dir`` as this plan's; True when that plan already finished there."""
    marker = out_dir / "_reshard.json"
    if marker.exists():
        info = read_json(marker)
        if info.get("plan") != digest:
            raise InputError(f"{out_dir} holds a reshard of another run, kept set or shard size; "
                             "delete it or choose another --output")
        return bool(info.get("complete"))
    if out_dir.exists() and any(not p.name.startswith(LOCK_NAME) for p in out_dir.iterdir()):
        raise InputError(f"{out_dir} is not empty and holds no reshard; choose an empty or new --output")
    write_json(marker, {"run": str(run_dir), "plan": digest, "samples_per_shard": per_shard, "keys": keys,
                        "complete": False})
    return False


def _run_tasks(todo: list[dict], workers: int) -> None:
    from ..run import progress

    with progress(len(todo), "reshard") as bar:
        if workers <= 1 or len(todo) <= 1:
            for t in todo:
                reshard_one(t)
                bar.update(1)
            return
        with process_pool(min(workers, len(todo))) as pool:  # workers die with this process
            for fut in as_completed([pool.submit(reshard_one, t) for t in todo]):
                fut.result()
                bar.update(1)


def _pattern(out_dir: Path, names: list[str]) -> str:
    if not names:
        return ""
    inner = names[0] if len(names) == 1 else f"{{{names[0]}..{names[-1]}}}"
    return os.path.join(str(out_dir), f"{inner}.tar")
