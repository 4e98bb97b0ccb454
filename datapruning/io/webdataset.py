"""Read webdataset tar shards as samples: {"__key__": key, ext: bytes}, with bad members counted, not fatal."""
from __future__ import annotations

import logging
import tarfile
from collections import Counter
from typing import Iterator

import fsspec

log = logging.getLogger(__name__)


class BadSample(ValueError):
    """A sample or shard that cannot be used; the message names the shard and key."""


def split_member(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/abc.seg.jpg' -> key 'dir/abc', extension 'seg.jpg' (lower-case)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def iter_tar_samples(path: str, shard: str, skipped: Counter, strict: bool = False) -> Iterator[dict]:
    """Yield grouped samples from a (possibly remote) tar. A truncated or non-tar file ends the shard
    with a counted skip (or raises BadSample in strict mode); files within a sample keep their bytes."""
    current: dict | None = None
    try:
        with fsspec.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member(member.name)
                if key.startswith("__") or not ext:  # webdataset ignores these too
                    continue
                data = tar.extractfile(member).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                if ext in current:
                    skip(skipped, "duplicate_member", shard, key, f"repeats .{ext}", strict)
                    continue
                current[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, BadSample):
            raise
        reason = "unreadable_shard" if current is None else "truncated_shard"
        skip(skipped, reason, shard, current["__key__"] if current else None, f"{type(exc).__name__}: {exc}", strict)
        return  # the partial last sample is dropped: it may be missing members
    if current is not None:
        yield current


def skip(skipped: Counter, reason: str, shard: str, key: str | None, detail: str, strict: bool) -> None:
    where = f"shard {shard}" + (f", key {key}" if key else "")
    if strict:
        raise BadSample(f"{where}: {reason} ({detail})")
    skipped[reason] += 1
    log.warning("skipping %s: %s (%s)", where, reason, detail)


