"""Read webdataset tar shards as samples: {"__key__": key, ext: bytes}, with bad members counted, not fatal."""
from __future__ import annotations

import logging
import tarfile
from collections import Counter
from typing import Iterator

import fsspec
from ..errors import BadSample

log = logging.getLogger(__name__)


def split_member(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/abc.seg.jpg' -> key 'dir/abc', extension 'seg.jpg' (lower-case)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def _tarfile_members(raw) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file, streamed by ``tarfile`` (any tar dialect, compressed too)."""
    with tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def _group(members, shard: str, skipped: Counter, strict: bool, state: dict) -> Iterator[dict]:
    """Group consecutive members by key into samples. The sample being built stays in ``state`` so the
    caller decides what to do with it (yield it at the end, or drop it when the tar breaks)."""
    for name, data in members:
        key, ext = split_member(name)
        if key.startswith("__") or not ext:  # webdataset ignores these too
            continue
        current = state["current"]
        if current is not None and current["__key__"] != key:
            state["current"] = None
            state["emitted"] += 1
            yield current
            current = None
        if current is None:
            current = state["current"] = {"__key__": key}
        if ext in current:
            skip(skipped, "duplicate_member", shard, key, f"repeats .{ext}", strict)
            continue
        current[ext] = data


def iter_tar_samples(path: str, shard: str, skipped: Counter, strict: bool = False,
                     fast: bool = False) -> Iterator[dict]:
    """Yield grouped samples from a (possibly remote) tar. A truncated or non-tar file ends the shard
    with a counted skip (or raises BadSample in strict mode); files within a sample keep their bytes.
    ``fast`` parses plain tars with ``io.tarstream`` and falls back to tarfile for anything else."""
    from .tarstream import Unsupported, plain_tar_members

    state, local = {"current": None, "emitted": 0}, Counter()
    try:
        with fsspec.open(path, "rb") as raw:
            yield from _group(plain_tar_members(raw) if fast else _tarfile_members(raw), shard, local, strict, state)
    except Unsupported as exc:
        log.info("shard %s: %s; reading it with tarfile", shard, exc)
        for i, sample in enumerate(iter_tar_samples(path, shard, skipped, strict)):
            if i >= state["emitted"]:
                yield sample
        return
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, BadSample):
            raise
        current = state["current"]
        reason = "unreadable_shard" if current is None else "truncated_shard"
        skip(local, reason, shard, current["__key__"] if current else None, f"{type(exc).__name__}: {exc}", strict)
        skipped.update(local)
        return  # the partial last sample is dropped: it may be missing members
    skipped.update(local)
    if state["current"] is not None:
        yield state["current"]


def skip(skipped: Counter, reason: str, shard: str, key: str | None, detail: str, strict: bool) -> None:
    where = f"shard {shard}" + (f", key {key}" if key else "")
    if strict:
        raise BadSample(f"{where}: {reason} ({detail})")
    skipped[reason] += 1
    log.warning("skipping %s: %s (%s)", where, reason, detail)


