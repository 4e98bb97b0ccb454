"""One writer per run folder: a lock file made atomically (link or O_EXCL), with pid, host, start time, heartbeat."""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import StageError, WriteFailed
from .files import pid_alive

log = logging.getLogger(__name__)

LOCK_NAME = ".datapruning.lock"
HEARTBEAT_S = float(os.environ.get("DATAPRUNING_LOCK_HEARTBEAT_S", "10"))  # the holder touches the lock this often
STALE_S = float(os.environ.get("DATAPRUNING_LOCK_STALE_S", "120"))  # another host's lock without a beat this long is dead
BREAK_STALE_S = 30.0  # a takeover guard older than this was left by a process that died while taking over

_held: dict[str, dict] = {}
_mutex = threading.RLock()


class RunFolderBusy(StageError):
    """Another live process writes the run folder; the message names its pid, host and start time."""


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # present but unreadable: judged by its age


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0



def stale_reason(holder: dict, path: Path) -> str | None:
    """Why the lock ``holder`` (read from ``path``) is dead, or None while its process may still run.
    Same host: the pid is gone or now belongs to another process. Other host (or unreadable lock): no
    heartbeat for ``STALE_S`` seconds."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        if not pid_alive(pid):
            return f"pid {pid} is no longer running"
        start = holder.get("pid_start")
        if start is not None and _pid_start(pid) not in (None, start):
            return f"pid {pid} now belongs to another process"
        return None
    age = _age(path)
    return f"no heartbeat for {age:.0f} s" if age > STALE_S else None


def describe(folder: Path, holder: dict) -> str:
    return (f"run folder {folder} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"since {holder.get('since', '?')}")


def _create(path: Path, info: dict) -> bool:
    """Make the lock file with its full content at once: hard-link a written file (atomic, NFS-safe),
    or O_EXCL where the filesystem has no hard links. False if a lock exists."""
    data = json.dumps(info).encode()
    tmp = path.with_name(f"{path.name}.{info['token']}")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _created(path: Path, info: dict) -> bool:
    """``_create``; a write that fails (a full disk) is a WriteFailed naming the lock file."""
    try:
        return _create(path, info)
    except OSError as exc:
        raise WriteFailed(f"cannot write the lock file {path}: {exc.strerror or exc}") from None


def _break(path: Path, holder: dict, reason: str) -> None:
    """Remove the dead lock ``holder``, under a guard file so that two processes taking over at once
    cannot remove a lock the other one just made."""
    guard = path.with_name(path.name + ".break")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        if _age(guard) > BREAK_STALE_S:
            guard.unlink(missing_ok=True)
        return
    try:
        now = _read(path)
        if now is not None and now.get("token") == holder.get("token"):
            log.warning("%s: taking over a stale lock (%s)", describe(path.parent, holder), reason)
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def _beat(path: Path, token: str, stop: threading.Event, state: dict) -> None:
    while not stop.wait(HEARTBEAT_S):
        holder = _read(path)
        if holder is None or holder.get("token") != token:
            state["lost"] = True
            log.error("run folder %s: lost its lock to another process", path.parent)
            return
        try:
            os.utime(path)
        except OSError as exc:
            log.warning("run folder %s: cannot refresh the lock (%s)", path.parent, exc)


def acquire(folder: str | Path, wait_s: float = 0.0) -> None:
    """Take the run folder's lock for this process (re-entrant; released by ``release`` or at exit).
    Raises RunFolderBusy naming the holder when another live process has it."""
    folder = Path(folder)
    try:
        str(folder.absolute()).encode("utf-8")
    except UnicodeEncodeError:  # pyarrow cannot write parquet under such a path
        shown = str(folder).encode("utf-8", "backslashreplace").decode()[:200]
        raise StageError(f"{shown}: the folder's path is not valid UTF-8; choose another") from None
    if folder.exists() and not folder.is_dir():
        raise StageError(f"{folder} is a file, not a folder; give a folder (new or a run folder) to write into")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    with _mutex:
        if key in _held:
            _held[key]["count"] += 1
            return
        path = folder / LOCK_NAME
        info = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _pid_start(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S%z"), "token": uuid.uuid4().hex}
        deadline = time.monotonic() + wait_s
        while not _created(path, info):
            holder = _read(path)
            if holder is None:
                continue  # released meanwhile
            reason = stale_reason(holder, path) if holder else ("unreadable lock" if _age(path) > 5 else None)
            if reason is not None:
                _break(path, holder, reason)
                time.sleep(0.01)
            elif time.monotonic() >= deadline:
                raise RunFolderBusy(describe(folder, holder) + "; wait for it to finish, or use another --output")
            else:
                time.sleep(0.1)
        stop, state = threading.Event(), {"lost": False}
        beat = threading.Thread(target=_beat, args=(path, info["token"], stop, state), daemon=True,
                                name="datapruning-lock")
        beat.start()
        _held[key] = {"path": path, "token": info["token"], "count": 1, "stop": stop, "state": state, "beat": beat,
                      "created": created}


def release(folder: str | Path, force: bool = False) -> None:
    """Drop one hold of the folder's lock; the last one removes the lock file (only if it is still ours)."""
    key = str(Path(folder).resolve())
    with _mutex:
        held = _held.get(key)
        if held is None:
            return
        held["count"] -= 1
        if held["count"] > 0 and not force:
            return
        del _held[key]
        held["stop"].set()
        held["beat"].join(timeout=5)  # no daemon thread left running into interpreter exit
        holder = _read(held["path"])
        if holder is not None and holder.get("token") == held["token"]:
            held["path"].unlink(missing_ok=True)
        if held["created"]:  # a command refused before it wrote anything leaves no empty folder behind
            try:
                held["path"].parent.rmdir()
            except OSError:
                pass


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        release(key, force=True)


@contextmanager
def locked(folder: str | Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the run folder's lock for the block."""
    acquire(folder, wait_s)
    try:
        yield
    finally:
        release(folder)


def holds(folder: str | Path) -> bool:
    return str(Path(folder).resolve()) in _held


def check_owner(folder: str | Path) -> None:
    """Raise if this process took the lock and has lost it since (a takeover after a long stall)."""
    held = _held.get(str(Path(folder).resolve()))
    if held is not None and held["state"]["lost"]:
        raise RunFolderBusy(f"run folder {folder}: another process took over its lock; stopping")


def ensure(folder: str | Path) -> None:
    """Make sure this process holds the folder's lock (taken until exit, or the caller's ``locked`` block)."""
    if holds(folder):
        check_owner(folder)
    else:
        acquire(folder)


def check_idle(folder: str | Path) -> None:
    """For readers: raise RunFolderBusy while another live process writes the folder."""
    path = Path(folder) / LOCK_NAME
    if holds(folder) or not path.exists():
        return
    holder = _read(path)
    if holder and stale_reason(holder, path) is None:
        raise RunFolderBusy(describe(Path(folder), holder) + "; its outputs are being written: wait for it to finish")
