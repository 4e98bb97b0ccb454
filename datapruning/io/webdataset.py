"""The one webdataset reader (tars, and img2dataset's files folders): samples by key, bad members counted."""
from __future__ import annotations

import gzip
import logging
import os
import random
import stat
import tarfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Any, Callable, Iterator

import fsspec
from ..errors import BadSample, DataPruningError, TruncatedShard, UnsafeMember

log = logging.getLogger(__name__)

Member = tuple[str, "tarfile.TarInfo | None", bytes]  # (suffix as written, header or None on the fast path, bytes)
OnSkip = Callable[[str, "str | None", str], None]  # (reason, key or None, detail): count it, log it, or raise
SHARD_DAMAGE = ("unreadable_shard", "truncated_shard")  # the reasons that end a shard early


def split_member(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/abc.seg.jpg' -> key 'dir/abc', extension 'seg.jpg' (lower-case)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def check_member(member: tarfile.TarInfo, shard: str) -> None:
    """Refuse a member that must not be copied: a link, a device or fifo, an absolute or '..' path."""
    name = member.name
    if member.issym() or member.islnk():
        raise UnsafeMember(f"shard {shard}: tar member {name!r} is a link; refusing to copy it")
    if not (member.isfile() or member.isdir()):
        raise UnsafeMember(f"shard {shard}: tar member {name!r} is not a regular file")
    if name.startswith("/") or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise UnsafeMember(f"shard {shard}: tar member {name!r} has an absolute or '..' path")


def skip(skipped: Counter, reason: str, shard: str, key: str | None, detail: str, strict: bool) -> None:
    """The counting error handler: count ``reason`` and log it, or raise BadSample in strict mode."""
    where = f"shard {shard}" + (f", key {key}" if key else "")
    if strict:
        raise BadSample(f"{where}: {reason} ({detail})")
    skipped[reason] += 1
    log.warning("skipping %s: %s (%s)", where, reason, detail)


def counting(skipped: Counter, shard: str, strict: bool = False) -> OnSkip:
    """``skip`` as an ``OnSkip`` handler for one shard."""
    return lambda reason, key, detail: skip(skipped, reason, shard, key, detail, strict)


class _StrictInfo(tarfile.TarInfo):
    """Headers read as tarfile reads them, except where its stream mode ends quietly: data that stops before the
    end-of-archive block (EndedEarly) or a header that does not parse (TruncatedShard) after the first member."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        from .tarstream import ENDED_EARLY, EndedEarly

        if len(buf) != tarfile.BLOCKSIZE:
            raise EndedEarly(ENDED_EARLY)
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as exc:
            raise TruncatedShard(f"tar: {exc}") from None


def _tarfile_members(raw, shard: str, safe: bool) -> Iterator[tuple[str, tarfile.TarInfo, bytes]]:
    """(name, header, bytes) of each regular file, streamed by ``tarfile`` (any tar dialect, compressed too).
    ``safe`` checks every member with ``check_member`` first; otherwise links, devices and folders are skipped."""
    with tarfile.open(fileobj=raw, mode="r|*", tarinfo=_StrictInfo) as tar:
        for member in tar:
            if safe:
                check_member(member, shard)
            if member.isfile():
                yield member.name, member, tar.extractfile(member).read()


def _folder_members(folder: str, shard: str, safe: bool) -> Iterator[tuple[str, tarfile.TarInfo, bytes]]:
    """(name, header, bytes) of the files of an img2dataset ``--output_format files`` shard folder, in name
    order (so a sample's files are consecutive, as in a tar); links are refused with ``safe``, else skipped."""
    import os

    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            if safe and stat.S_ISLNK(st.st_mode):
                raise UnsafeMember(f"shard {shard}: {name!r} is a link; refusing to copy it")
            continue
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), st.st_mode & 0o777
        with open(path, "rb") as fh:
            yield name, info, fh.read()


def _fast_members(raw) -> Iterator[tuple[str, None, bytes]]:
    from .tarstream import plain_tar_members

    for name, data in plain_tar_members(raw):
        yield name, None, data


def _group(members, on_skip: OnSkip, state: dict) -> Iterator[tuple[str, list[Member]]]:
    """Group consecutive members by key. The group being built stays in ``state`` until the next key starts,
    so a tar that breaks drops it (it may be missing members). First copy of an extension, first group of a
    key win; the repeats are reported to ``on_skip``."""
    seen: set[str] = set()
    bad = None
    for name, info, data in members:
        key, ext = split_member(name)
        if not utf8(name):  # tar names are bytes; a key that is not UTF-8 cannot be a manifest uid
            if key != bad:  # once per sample, named with its bytes escaped
                on_skip("bad_member_name", ascii(key.encode("utf-8", "surrogateescape"))[2:-1],
                        f"tar member name {ascii(name.encode('utf-8', 'surrogateescape'))[1:]} is not valid UTF-8")
            bad = key
            continue
        if key.startswith("__") or not ext:  # webdataset ignores these too
            continue
        if state["key"] != key:
            if state["members"]:
                yield state["key"], state["members"]
            state["key"], state["members"] = key, []
            if key in seen:
                on_skip("duplicate_key", key, "key repeats within the shard")
                state["members"] = None  # drop the members of this group
                continue
            seen.add(key)
        if state["members"] is None:
            continue
        if any(suffix.lower() == ext for suffix, _, _ in state["members"]):
            on_skip("duplicate_member", key, f"repeats .{ext}")
            continue
        state["members"].append((name[len(key) + 1:], info, data))


def utf8(name: str) -> bool:
    """False for a name decoded with surrogate escapes (its bytes were not UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


RETRY = {"retries": 3, "backoff_s": 1.0}  # transient faults reading a shard: tries after the first, first wait


@contextmanager
def retrying(retries: int, backoff_s: float) -> Iterator[None]:
    """Set how often (and how patiently) the tar reader retries a shard it cannot reach, for the block."""
    old = dict(RETRY)
    RETRY.update(retries=retries, backoff_s=backoff_s)
    try:
        yield
    finally:
        RETRY.update(old)


class ShardUnavailable(DataPruningError, OSError):
    """A shard could not be reached or read even after retries: failed, not done, so a rerun retries it."""


class StreamEnded(OSError):
    """A shard's bytes stopped before its known size (a connection cut short): transient, retried."""


class _Counting:
    """A file object that counts the bytes read through it, to tell a stream that ended early from a short file."""

    def __init__(self, raw):
        self.raw, self.read_bytes = raw, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.raw, name)


def _size(raw) -> int | None:
    """The file's size if its filesystem tells it (an HTTP Content-Length, a local file's), else None."""
    size = getattr(raw, "size", None)
    if isinstance(size, int):
        return size
    try:
        return os.fstat(raw.fileno()).st_size
    except (OSError, AttributeError, ValueError):
        return None


def _ended_early(exc: BaseException) -> bool:
    """The reader met the end of the data (not a bad header): truncation, or a stream cut short."""
    from .tarstream import EndedEarly

    return isinstance(exc, (EndedEarly, EOFError)) or "unexpected end of data" in str(exc)


def transient(exc: BaseException) -> bool:
    """A fault in reaching the bytes (network, I/O), not in the bytes: worth retrying, never a corrupt shard."""
    if isinstance(exc, (DataPruningError, tarfile.TarError, EOFError, gzip.BadGzipFile)):
        return False
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.split(".")[0] in REMOTE_CLIENTS


REMOTE_CLIENTS = ("aiohttp", "fsspec", "requests", "urllib3", "botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs")


def iter_tar_groups(path: str, shard: str, on_skip: OnSkip, fast: bool = False,
                    safe: bool = False) -> Iterator[tuple[str, list[Member]]]:
    """Yield ``(key, [(suffix as written, tarinfo or None, bytes), ...])`` per sample of a (possibly remote) tar.

    Consecutive members with one key form a sample; names starting with '__' and names without an extension
    are ignored; a repeated extension or a repeated key is reported to ``on_skip`` and the first one kept.
    A truncated or non-tar file ends the shard through ``on_skip`` ('truncated_shard' when a sample was being
    read, which is dropped; else 'unreadable_shard'). A fault in reaching the bytes (``transient``) is retried
    ``RETRY`` times with doubling waits, resuming after the samples already handed out; then ShardUnavailable.
    ``fast`` parses plain tars with ``io.tarstream`` (no tarinfo) and falls back to tarfile for anything else.
    ``safe`` raises UnsafeMember on links, devices, absolute and '..' names (for readers that copy members)
    instead of skipping them."""
    given = {"groups": 0, "skips": 0}  # handed out so far, over all attempts
    for attempt in range(RETRY["retries"] + 1):
        seen = {"groups": 0, "skips": 0}

        def report(reason, key, detail, seen=seen):
            seen["skips"] += 1
            if seen["skips"] > given["skips"]:
                given["skips"] += 1
                on_skip(reason, key, detail)

        try:
            for group in _read_once(path, shard, report, fast, safe):
                seen["groups"] += 1
                if seen["groups"] > given["groups"]:
                    given["groups"] += 1
                    yield group
            return
        except Exception as exc:  # noqa: BLE001 (sorted by ``transient``; the rest re-raised)
            if not transient(exc):
                raise
            error = _wait_to_retry(shard, exc, attempt)
    raise ShardUnavailable(f"shard {shard}: cannot read {str(path)[:200]} after {RETRY['retries'] + 1} tries ({error})")


def _wait_to_retry(shard: str, exc: BaseException, attempt: int) -> str:
    """Log a transient fault and sleep before the next try (doubling waits with jitter); returns the fault."""
    error = f"{type(exc).__name__}: {str(exc)[:200]}"
    if attempt < RETRY["retries"]:
        wait = RETRY["backoff_s"] * 2 ** attempt * random.uniform(0.5, 1.0)  # noqa: S311 (jitter)
        log.warning("shard %s: %s; retrying in %.1f s (%d of %d)", shard, error, wait, attempt + 1, RETRY["retries"])
        time.sleep(wait)
    return error


def with_retries(fn: Callable[[], Any], shard: str, path: str) -> Any:
    """``fn()`` (reading one whole shard), retried as a tar shard is on a fault in reaching its bytes
    (``transient``); still failing after ``RETRY`` tries: ShardUnavailable."""
    for attempt in range(RETRY["retries"] + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 (sorted by ``transient``; the rest re-raised)
            if not transient(exc):
                raise
            error = _wait_to_retry(shard, exc, attempt)
    raise ShardUnavailable(f"shard {shard}: cannot read {str(path)[:200]} after {RETRY['retries'] + 1} tries ({error})")


def _read_once(path: str, shard: str, report: OnSkip, fast: bool, safe: bool) -> Iterator[tuple[str, list[Member]]]:
    """One pass over the tar for ``iter_tar_groups``; transient faults propagate."""
    from .tarstream import Unsupported

    state = {"key": None, "members": None, "emitted": 0, "reported": 0}

    def counted(reason, key, detail):
        state["reported"] += 1
        report(reason, key, detail)

    damage = None
    try:
        if is_folder(path):  # img2dataset's files layout: a folder of {key}.{ext} files, no stream to cut short
            for group in _group(_folder_members(path, shard, safe), counted, state):
                state["emitted"] += 1
                yield group
        else:
            with fsspec.open(path, "rb") as opened:
                raw = _Counting(opened)
                members = _fast_members(raw) if fast and not safe else _tarfile_members(raw, shard, safe)
                try:
                    for group in _group(members, counted, state):
                        state["emitted"] += 1
                        yield group
                except (tarfile.TarError, EOFError, TruncatedShard) as exc:
                    size = _size(opened)
                    if _ended_early(exc) and (raw.read_bytes < size if size is not None else "://" in str(path)):
                        raise StreamEnded(f"the data stopped after {raw.read_bytes} of {size or '?'} bytes") from None
                    raise
    except Unsupported as exc:
        log.info("shard %s: %s; reading it with tarfile", shard, exc)
        yield from _reread(path, shard, report, state["emitted"], state["reported"])
        return
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if (isinstance(exc, DataPruningError) and not isinstance(exc, TruncatedShard)) or transient(exc):
            raise
        damage = f"{type(exc).__name__}: {exc}" if not isinstance(exc, TruncatedShard) else str(exc)
    if damage is not None:
        key = state["key"]
        counted("unreadable_shard" if key is None else "truncated_shard", key, damage)
        return  # the partial last sample is dropped: it may be missing members
    if state["members"]:
        yield state["key"], state["members"]


def is_folder(path: str) -> bool:
    """A local folder: an img2dataset ``files`` shard, read as the tar it would have been."""
    import os

    return "://" not in str(path) and os.path.isdir(path)


def _reread(path: str, shard: str, on_skip: OnSkip, emitted: int, reported: int):
    """The tarfile pass after the fast parser gave up: it meets the same members in the same order, so the
    first ``emitted`` samples and ``reported`` skips were already handed out."""
    left = [reported]

    def once(reason, key, detail):
        if left[0] > 0:
            left[0] -= 1
            return
        on_skip(reason, key, detail)

    for i, group in enumerate(_read_once(path, shard, once, False, False)):
        if i >= emitted:
            yield group


def iter_tar_samples(path: str, shard: str, skipped: Counter, strict: bool = False,
                     fast: bool = False) -> Iterator[dict]:
    """Yield samples ``{"__key__": key, ext: bytes}`` (extensions lower-case) from ``iter_tar_groups``, each
    skip counted in ``skipped`` (or raised as BadSample in strict mode)."""
    for key, members in iter_tar_groups(path, shard, counting(skipped, shard, strict), fast=fast):
        sample = {"__key__": key}
        for suffix, _, data in members:
            sample[suffix.lower()] = data
        yield sample
