"""Atomic writes and per-shard done markers: a crash never leaves half a file that looks finished."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ..errors import StageError, WriteFailed


_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]
_TEMP_PID = re.compile(r"\.p(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*)\.")


def temp_prefix(name: str) -> str:
    """The prefix of a temporary name for ``name`` owned by this process (``clean_temp`` keeps a live one's)."""
    return f".{name}.p{os.getpid()}@{_HOST}."


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.p{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, WriteFailed):
            raise
        raise WriteFailed(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def scratch_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` for work in progress, removed on exit (``clean_temp`` removes one a
    killed run left)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.p{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success swap it in for ``path`` (the old folder is
    removed), so readers see all the old files or all the new ones, never a mix. A crash leaves only temporary
    folders (at worst, between the two renames, no ``path`` at all), removed by the next call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temp(path.parent, f".{glob.escape(path.name)}.p*.tmp")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.p{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.p{os.getpid()}@{_HOST}.old.", suffix=".tmp",
                                        dir=path.parent))
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        message = str(exc) if isinstance(exc, WriteFailed) else f"cannot write {path}: {exc.strerror or exc}"
        raise WriteFailed(message.replace(str(tmp), str(path))) from exc  # name the file, not the temporary folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n").encode())


def write_parquet(path: str | Path, table: pa.Table) -> None:
    """One parquet file, atomically; a zero-row table gets no row group at all (Hugging Face ``datasets`` sizes
    its batches by the first row group and refuses an empty one)."""
    with atomic_path(path) as tmp:
        if table.num_rows:
            pq.write_table(table, tmp, compression="snappy")  # zstd reads ~2.5x slower on float embeddings for 8% less disk
        else:
            pq.ParquetWriter(tmp, table.schema, compression="snappy").close()


class RowGroupWriter:
    """One parquet file written from tables handed in one after the other, in row groups of exactly ``rows``
    rows (the last may be shorter), atomically on leaving the ``with`` block: its bytes depend on the rows and
    ``rows`` alone, not on how they were handed in, and a file of at most ``rows`` rows has the bytes
    ``write_parquet`` gives it. ``rows`` may be set until the first table is added. No row: no row group, with
    the schema of the last (empty) table added."""

    def __init__(self, path: str | Path, rows: int | None = None):
        self.path, self.rows, self.schema = Path(path), rows, None
        self._pending, self._held, self._writer = [], 0, None

    def __enter__(self):
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        return self

    def add(self, table: pa.Table) -> None:
        self.schema = table.schema
        if table.num_rows:
            self._pending.append(table)
            self._held += table.num_rows
            if self._held >= self.rows:
                self._flush(final=False)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._pending)
        take = table.num_rows if final else table.num_rows - table.num_rows % self.rows
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, table.schema, compression="snappy")
        if take:
            self._writer.write_table(table.slice(0, take), row_group_size=self.rows)
        rest = table.slice(take)
        self._pending, self._held = ([rest] if rest.num_rows else []), rest.num_rows

    def __exit__(self, kind, exc, tb):
        from_body = kind is not None
        try:
            if not from_body:
                if self._pending:
                    self._flush(final=True)
                if self._writer is None:
                    self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="snappy")
            if self._writer is not None:
                self._writer.close()
        except BaseException as err:  # handed to atomic_path, which removes the temporary file
            kind, exc, tb = type(err), err, err.__traceback__
        handled = self._atomic.__exit__(kind, exc, tb)
        if exc is not None and not from_body and not handled:
            raise exc
        return handled


def write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def write_raw(path: str | Path, array: np.ndarray) -> None:
    """The array's bytes, no header (read back with a seek and ``np.fromfile``)."""
    with atomic_path(path) as tmp:
        np.ascontiguousarray(array).tofile(tmp)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


META = "_meta"  # markers of folder X live in X/../_meta/X/: data folders hold data only, and readers skip "_"


def meta_dir(folder: str | Path) -> Path:
    """Where the markers and info files of ``folder`` live: beside it, under ``_meta/``, never inside it."""
    folder = Path(folder)
    return folder.parent / META / folder.name


def stage_marker(stage_dir: str | Path) -> Path:
    """The stage's fingerprint file (which config and inputs its outputs belong to)."""
    return meta_dir(stage_dir) / "stage.json"


def done_path(stage_dir: str | Path, shard: str) -> Path:
    return meta_dir(stage_dir) / f"_{shard}.done.json"


def is_done(stage_dir: str | Path, shard: str) -> bool:
    return done_path(stage_dir, shard).exists()


def mark_done(stage_dir: str | Path, shard: str, info: dict[str, Any], files=()) -> None:
    """Write the shard's stats json last; it doubles as the done marker, and vouches for ``files`` (written
    before it, under ``stage_dir``'s parent): each one's size, a digest of its ends and its sha256."""
    vouched = {"files": vouch(Path(stage_dir).parent, files)} if files else {}
    write_json(done_path(stage_dir, shard), {**info, **vouched})


# ---- what a marker vouches for ------------------------------------------------------------------------------
SAMPLE_BYTES = 4096  # the ends of a file read again on every check: cheap, and a copy of the folder keeps them


def _ends(path: Path, size: int) -> str:
    with open(path, "rb") as fh:
        data = fh.read(SAMPLE_BYTES)
        if size > SAMPLE_BYTES:
            fh.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            data += fh.read()
    return hashlib.sha256(data).hexdigest()[:16]


def file_record(path: str | Path) -> dict:
    """What a done marker keeps about one file: ``size``, ``ends`` (a digest of its first and last 4 KiB, checked
    on every rerun) and ``sha256`` (of it all, read once as it is written: a redone file that comes out the
    same leaves the later stages standing)."""
    path = Path(path)
    size, digest = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return {"size": size, "ends": _ends(path, size), "sha256": digest.hexdigest()}


def vouch(root: Path, files) -> dict:
    """``{path relative to root: file_record}`` for ``files``."""
    return {str(Path(f).relative_to(root)) if Path(f).is_relative_to(root) else str(f): file_record(f)
            for f in files}


_ENDS_SEEN: dict[tuple, str] = {}  # (path, size, mtime, inode) -> digest of the ends: a run checks a file once


def file_problem(path: Path, record: dict) -> str | None:
    """Why ``path`` no longer matches its ``record``: missing, cut short, grown or replaced; None when it does."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if st.st_size != record["size"]:
        return f"{'truncated' if st.st_size < record['size'] else 'changed'} ({st.st_size} of {record['size']} bytes)"
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)  # files are replaced by rename: a new inode
    if key not in _ENDS_SEEN:
        _ENDS_SEEN[key] = _ends(path, st.st_size)
    return "replaced (its content differs)" if _ENDS_SEEN[key] != record["ends"] else None


def marker_problems(marker: str | Path, root: str | Path) -> list[tuple[str, str]]:
    """(file, why) for each file ``marker`` vouches for (paths under ``root``) that is gone or changed; a
    marker that vouches for no file (or cannot be read) has none."""
    try:
        files = read_json(marker).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return []
    root = Path(root)
    return [(rel, why) for rel, record in files.items() if (why := file_problem(root / rel, record)) is not None]


def damaged_units(stage_dir: str | Path) -> dict[str, list[tuple[str, str]]]:
    """{unit: [(file, why), ...]} of the done units of ``stage_dir`` whose files are gone or changed."""
    from concurrent.futures import ThreadPoolExecutor

    stage_dir = Path(stage_dir)
    markers = sorted(meta_dir(stage_dir).glob("_*.done.json"))
    with ThreadPoolExecutor(8) as pool:  # a stat and two small reads per file: latency, not bandwidth
        found = pool.map(lambda m: marker_problems(m, stage_dir.parent), markers)
        return {m.name[1:-len(".done.json")]: bad for m, bad in zip(markers, found) if bad}


def match_empty_schemas(stage_dir: str | Path, files: dict[str, Path]) -> list[str]:
    """Give each zero-row file of ``files`` (shard name -> parquet path) the schema of the first file with rows,
    rewriting it and its done marker: a folder reader (pyarrow, HF ``datasets``) takes one file's schema for all,
    and a shard with no rows cannot know the embedding width or the optional columns. Returns the names fixed."""
    metas = {name: pq.read_metadata(path) for name, path in files.items()}
    full = next((m.schema.to_arrow_schema() for m in metas.values() if m.num_rows), None)
    fixed = [n for n, m in metas.items() if full is not None and not m.num_rows
             and not m.schema.to_arrow_schema().equals(full, check_metadata=False)]
    for name in fixed:
        write_parquet(files[name], full.empty_table())
        info = {k: v for k, v in read_json(done_path(stage_dir, name)).items() if k != "files"}
        mark_done(stage_dir, name, info, files=[files[name]])  # the marker vouches for the rewritten file
    return fixed


def check_any_rows(stage_dir: str | Path, shards: list[str]) -> None:
    """Stop when the finished shards of ``stage_dir`` (the embed stage's) hold no row at all: every input sample
    was skipped, or no shard was read. The message adds up the skip counts and says where they are."""
    infos = [read_json(done_path(stage_dir, s)) for s in shards if is_done(stage_dir, s)]
    if len(infos) < len(shards) or any(info.get("rows") for info in infos):
        return
    skipped: dict[str, int] = {}
    for info in infos:
        for reason, n in info.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
    why = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items())) or "the shards hold no samples"
    raise StageError(f"no valid samples found in the {len(infos)} input shard(s) ({why}); the counts per shard "
                     f"are in {meta_dir(stage_dir)}/_<shard>.done.json, and the log names each skipped sample")


def clean_temp(folder: str | Path, pattern: str = ".*.tmp", deep: bool = False) -> int:
    """Remove temporary files (and ``atomic_dir`` folders) a killed run left in ``folder`` and its meta folder,
    with ``deep`` in their sub-folders too (never taken for outputs: they are only renamed into place when
    complete). Those of a process that still runs on this host are kept: the run folder's lock admits one
    writer, but a reader (reshard, eval) may write beside it."""
    removed = 0
    found_all = [p for f in (Path(folder), meta_dir(folder)) for p in (f.rglob(pattern) if deep else f.glob(pattern))]
    for tmp in found_all:
        found = _TEMP_PID.search(tmp.name)
        if found and found["host"] == _HOST and int(found["pid"]) != os.getpid() and pid_alive(int(found["pid"])):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def clean_stage(stage_dir: str | Path) -> None:
    """Remove a stage's outputs and its markers (used when its config changed)."""
    shutil.rmtree(stage_dir, ignore_errors=True)
    shutil.rmtree(meta_dir(stage_dir), ignore_errors=True)
