"""A plain-tar member reader about 2.5x faster than tarfile, fast enough for one thread to feed nvjpeg.

tarfile costs ~5x more Python time per member. Tars this reader does not handle raise ``Unsupported`` so the
caller can fall back to tarfile."""
from __future__ import annotations

import struct
from ..errors import TruncatedShard

class Unsupported(Exception):
    """A tar feature left to ``tarfile`` (compression, sparse files, pax sizes, base-256 numbers)."""


class _BadHeader(Exception):
    pass


class _EndHeader(_BadHeader):
    """A zero block: the end of the archive (an empty archive when it comes first)."""


class _ShortHeader(_BadHeader):
    """The data ended where a header should be: no end-of-archive block."""


class EndedEarly(TruncatedShard):
    """The tar's bytes ended before its end-of-archive block (inside a member or a header, or between two)."""


ENDED_EARLY = "tar: the data ends before the end-of-archive block (truncated)"


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
REGULAR, NOT_FILES = (b"0", b"\0", b"7"), (b"1", b"2", b"3", b"4", b"5", b"6")
PAX_IGNORED = {"mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment", "linkpath"}


def _nti(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):
        raise Unsupported("base-256 number")
    try:
        return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
    except (UnicodeDecodeError, ValueError):
        raise _BadHeader("invalid header") from None


def _parse_header(buf: bytes) -> tuple[bytes, bytes, int]:
    """(name with ustar prefix, type flag, size) of one 512-byte header, checked as tarfile checks it."""
    if len(buf) != 512:
        raise _ShortHeader("short header")
    if not buf.strip(b"\0"):
        raise _EndHeader("end of archive")
    if _nti(buf[148:156]) not in (256 + sum(struct.unpack_from("148B8x356B", buf)),
                                  256 + sum(struct.unpack_from("148b8x356b", buf))):
        raise _BadHeader("bad checksum")
    name, typ, size = buf[0:100].split(b"\0", 1)[0], buf[156:157], _nti(buf[124:136])
    if typ == b"\0" and name.endswith(b"/"):
        typ = b"5"  # old V7 directory
    prefix = buf[345:500].split(b"\0", 1)[0]
    if prefix and typ not in (b"L", b"K", b"S"):
        name = prefix + b"/" + name
    return name, typ, size


def _read_exact(raw, n: int) -> bytes:
    data = raw.read(n)
    while len(data) < n:
        more = raw.read(n - len(data))
        if not more:
            raise EOFError("unexpected end of data")
        data += more
    return data


def _pax_path(data: bytes) -> bytes | None:
    path, pos = None, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            path = value
        elif key.decode("utf-8", "replace") not in PAX_IGNORED:
            raise Unsupported(f"pax key {key!r}")
        pos += length
    return path


def plain_tar_members(raw):
    """(name, bytes) of the regular files of an uncompressed tar, ending and failing where ``io.webdataset``'s
    strict tarfile reader does: only a zero block ends it; data that stops before one raises EndedEarly (short
    member data: EOFError), a bad header TruncatedShard."""
    offset, long_name, pax, pad = 0, None, None, 0
    while True:
        _read_exact(raw, pad)  # the last member's padding, read when tarfile reads it: before the next header
        head = raw.read(512)
        if offset == 0 and head.startswith(COMPRESSED_MAGIC):
            raise Unsupported("compressed tar")
        try:
            name, typ, size = _parse_header(head)
        except _BadHeader as exc:
            if isinstance(exc, _EndHeader) and long_name is None and pax is None:
                return
            if isinstance(exc, _ShortHeader):
                raise EndedEarly(ENDED_EARLY) from None
            raise TruncatedShard(f"tar: {exc}") from None
        offset += 512
        if typ == b"S":
            raise Unsupported("sparse member")
        data = None
        pad = 0
        if typ not in NOT_FILES:
            data, pad = _read_exact(raw, size), -size % 512
            offset += size + pad
        if typ in (b"L", b"K"):
            long_name = data.split(b"\0", 1)[0] if typ == b"L" else long_name
            continue
        if typ in (b"x", b"g"):
            path = _pax_path(data)
            if typ == b"g" and path is not None:
                raise Unsupported("global pax path")
            pax = path if typ == b"x" else pax
            continue
        name = pax if pax is not None else long_name if long_name is not None else name
        long_name = pax = None
        if typ in REGULAR:
            yield name.decode("utf-8", "surrogateescape"), data
