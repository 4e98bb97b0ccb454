"""Shard discovery: local folders, globs, brace patterns ('shards/{00000..00099}.tar') and fsspec URLs.

Local paths come back absolute, so a run works from any directory; an img2dataset / DataComp download folder
(``{:08d}.tar`` beside ``.parquet``, ``_stats.json`` and ``.json`` side files) lists only its tars, an img2dataset
``files`` folder its subfolders, and DataComp's resharder output its tars (not ``sample_ids.npy``)."""
from __future__ import annotations

import glob
import logging
import os
import re
from pathlib import Path

import fsspec
from ..errors import InputError
from .webdataset import utf8

log = logging.getLogger(__name__)

SUFFIXES = {".tar": "webdataset", ".parquet": "parquet", ".npy": "npy", ".tar.gz": "webdataset", ".tgz": "webdataset"}
SIDE_FILES = (".parquet", ".json")  # img2dataset / DataComp metadata beside a shard of the same stem: not shards


def _braceexpand(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def expand_input(spec: str | list[str], side: str = "img_emb") -> list[str]:
    """All shard paths named by ``spec``, in a stable order, local ones absolute. A folder lists its shards (or
    is a clip-retrieval output folder, read from its ``side``: img_emb or text_emb); brace patterns and globs
    expand; URLs go through fsspec. Side files (a .parquet or .json with the stem of a .tar or .npy beside it)
    are metadata and are dropped."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in specs:
        before = len(out)
        literal = item[len("file://"):] if item.startswith("file://") else item
        for path in [item] if not _is_url(item) and os.path.exists(literal) else _braceexpand(item):
            if _is_url(path):
                protocol = _check_protocol(path)
                if any(ch in path for ch in "*?["):
                    try:
                        fs, _ = fsspec.core.url_to_fs(path)
                        found = fs.glob(path)
                    except Exception as exc:  # noqa: BLE001 (any remote client's error: one line, named)
                        raise InputError(f"input {path[:200]}: cannot list it ({type(exc).__name__}: "
                                         f"{str(exc)[:200]})") from None
                    out.extend(sorted(f"{protocol}://{p.split('://', 1)[-1]}" for p in found))
                else:
                    out.append(path)
                continue
            path = path[len("file://"):] if path.startswith("file://") else path
            if os.path.isdir(path):
                out.extend(_list_folder(os.path.abspath(path), side))
            elif os.path.exists(path):  # a literal name wins over a glob reading of '[' '*' '?'
                out.append(os.path.abspath(path))
            elif any(ch in path for ch in "*?["):
                for found in without_side_files(_glob(path)):
                    found = os.path.abspath(found)
                    out.extend(_list_folder(found, side) if os.path.isdir(found) else [found])
            else:
                raise InputError(f"input {_shown(path)}: no such file or folder")
        if len(out) == before:  # one pattern of several matching nothing is a mistake too, not a smaller input
            raise InputError(f"input {_shown(repr(item))}: matched no shards")
    for path in out:
        if not utf8(path):  # pyarrow cannot open such a path, and uids and outputs would carry it
            raise InputError(f"input {_shown(path)}: the name is not valid UTF-8; rename the file")
    return list(dict.fromkeys(out))


def _glob(pattern: str) -> list[str]:
    """``glob`` where the longest leading part of ``pattern`` that exists as written is taken literally
    (a folder named 'd[1]' is not the character class that matches 'd1')."""
    parts = Path(pattern).parts
    for i in range(len(parts) - 1, 0, -1):
        head = os.path.join(*parts[:i])
        if os.path.isdir(head):
            return sorted(glob.glob(os.path.join(glob.escape(head), *parts[i:])))
    return sorted(glob.glob(pattern))


def _check_protocol(url: str) -> str:
    """The URL's scheme, if fsspec can open it (every link of a chained URL such as ``simplecache::s3://``);
    else an InputError naming the package to install."""
    protocol = url.split("://", 1)[0]
    for link in protocol.split("::"):
        try:
            fsspec.get_filesystem_class(link)
        except ImportError as exc:
            raise InputError(f"input {url[:200]}: reading {link}:// needs another package ({exc})") from None
        except ValueError:
            raise InputError(f"input {url[:200]}: unknown URL scheme {link[:50]!r}") from None
    return protocol


def _list_folder(folder: str, side: str = "img_emb") -> list[str]:
    parts = _clip_retrieval_parts(folder, side)
    if parts is not None:
        return parts
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    files = [e.path for e in entries if e.is_file() and not e.name.startswith(".")]
    subs = _files_shards(folder, files)  # img2dataset files: a folder per shard, its .parquet is metadata
    found = [p for p in without_side_files([p for p in files if shard_suffix(p) in SUFFIXES]) if not _loose_npy(p)
             and _stem(p) not in subs] + subs
    loose = [Path(p).name for p in files if _loose_npy(p) and Path(p).name not in DATACOMP_FILES]
    if not found and loose:
        raise InputError(f"input folder {_shown(folder)}: {loose[0]} has no {Path(loose[0]).stem}.parquet beside "
                         "it; an embeddings .npy needs one with a uid per row (input.id_column)")
    if not found:
        raise InputError(f"input folder {_shown(folder)}: holds no .tar, .tar.gz, .parquet or .npy files")
    stems = {_stem(f) for f in found}
    left = [Path(p).name for p in files if p not in found and not Path(p).name.startswith("_")
            and not (Path(p).suffix in SIDE_FILES + (".npz",) and _stem(p) in stems)
            and Path(p).name not in DATACOMP_FILES]
    unread = [f"{e.name} ({why})" for e in entries if e.path not in subs and (why := _left_out(e))]
    for what, names in (("file(s) that are not shards", left), ("entries that look like shards", unread)):
        if names:
            log.warning("input folder %s: left out %d %s: %s", _shown(folder), len(names), what,
                        ", ".join(_shown(n, 100) for n in names[:10]) + (" ..." if len(names) > 10 else ""))
    return found


DATACOMP_FILES = ("sample_ids.npy", "meta.json", "sizes.json")  # what DataComp's resharder writes beside its tars


def _loose_npy(path: str) -> bool:
    """A .npy that is no shard: an embeddings .npy comes with a same-stem .parquet of ids (DataComp's
    resharder leaves its subset file, ``sample_ids.npy``, beside its tars)."""
    return path.endswith(".npy") and not os.path.exists(path[:-len(".npy")] + ".parquet")


def _clip_retrieval_parts(folder: str, side: str) -> list[str] | None:
    """A clip-retrieval output folder's ``side`` parts (img_emb/ for images and pairs, text_emb/ for texts);
    None for another kind of folder. A folder without the side asked for is refused, naming it."""
    have = [emb for emb in ("img_emb", "text_emb") if os.path.isdir(os.path.join(folder, emb))]
    if not have:
        return None
    if side not in have:
        modality = "text" if side == "text_emb" else "image (or pair)"
        raise InputError(f"input folder {folder}: a clip-retrieval folder without {side}/ (it has "
                         f"{', '.join(h + '/' for h in have)}); embed.modality={modality.split()[0]} reads {side}/")
    parts = sorted(glob.glob(os.path.join(glob.escape(folder), side, "*.npy")), key=_natural)
    if not parts:
        raise InputError(f"input folder {folder}: {side}/ holds no .npy files")
    return parts


def _files_shards(folder: str, files: list[str]) -> list[str]:
    """img2dataset's ``--output_format files``: one subfolder of ``{key}.{ext}`` files per shard, beside its
    ``{shard}.parquet`` and ``{shard}_stats.json``; the subfolders are the shards."""
    stems = {_stem(f) for f in files if f.endswith((".parquet", "_stats.json"))}
    subs = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), "*")) if os.path.isdir(p))
    return [d for d in subs if d in stems]


def _left_out(entry: os.DirEntry) -> str | None:
    """Why a folder entry that looks like it holds shards is not read: hidden, a broken link, or a sub-folder."""
    if entry.is_dir():
        readable = os.access(entry.path, os.R_OK)
        inside = [n for n in os.listdir(entry.path) if shard_suffix(n) in SUFFIXES] if readable else []
        return f"a sub-folder with {len(inside)} shard file(s); name it in --input" if inside else None
    if shard_suffix(entry.name) not in SUFFIXES:
        return None
    if entry.is_symlink() and not os.path.exists(entry.path):
        return "a broken symbolic link"
    if entry.name.startswith("."):
        return "a hidden file"
    return None


def _shown(text: str, limit: int = 200) -> str:
    """A path or name for a message: non-UTF-8 bytes escaped, at most ``limit`` characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8") if not utf8(text) else text
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_output(output: str | Path, specs, paths: list[str]) -> None:
    """Refuse an output folder that is an input shard, holds input shards (its kept.parquet would be read as one
    on a rerun) or lies inside a folder given as input."""
    out = Path(output).resolve()
    folders = [Path(s).resolve() for s in ([specs] if isinstance(specs, str) else specs)
               if not _is_url(s) and os.path.isdir(s)]
    for folder in folders:
        if out == folder or folder in out.parents:
            raise InputError(f"--output {_shown(str(output))} is {'the' if out == folder else 'inside the'} input "
                             f"folder {_shown(str(folder))}; choose an output outside the input")
    for path in paths:
        if not _is_url(path) and out in (Path(path).resolve(), Path(path).resolve().parent):
            raise InputError(f"--output {_shown(str(output))} {'is' if out == Path(path).resolve() else 'holds'} the "
                             f"input shard {_shown(path)}; choose an output outside the input")


def shard_suffix(path: str) -> str:
    """'.tar.gz' for 'a.tar.gz' (and 'x.v2.tar.gz'), else the last suffix."""
    name = Path(path.split("?", 1)[0]).name.lower()
    return ".tar.gz" if name.endswith(".tar.gz") else Path(name).suffix


def _stem(path: str) -> str:
    name = Path(path).name
    name = name[:-len("_stats.json")] if name.endswith("_stats.json") else name
    return str(Path(path).parent / name.split(".")[0])


def without_side_files(paths: list[str]) -> list[str]:
    """Absolute paths of ``paths`` less the side files of a .tar or .npy shard (same folder and stem)."""
    paths = [os.path.abspath(p) for p in paths]
    shards = {_stem(p) for p in paths if shard_suffix(p) in (".tar", ".tar.gz", ".tgz", ".npy")}
    return [p for p in paths if not (Path(p).suffix in SIDE_FILES and _stem(p) in shards)]


def detect_format(paths: list[str], declared: str = "auto") -> str:
    """The input format: the declared one, or the one all paths share by suffix."""
    if declared != "auto":
        return declared
    kinds = set()
    for p in paths:
        if not _is_url(p) and os.path.isdir(p):
            kinds.add("webdataset")  # an img2dataset files folder, read as the tar it would have been
        elif Path(p).parent.name in ("img_emb", "text_emb") and Path(p).parent.parent.joinpath("metadata").is_dir():
            kinds.add("clip_retrieval")
        elif p.endswith(".parquet") and not _is_url(p) and os.path.exists(p[:-len(".parquet")] + ".npz"):
            kinds.add("datacomp")  # DataComp's metadata: uid, url, text, ... plus same-name .npz embeddings
        else:
            suffix = shard_suffix(p)
            kinds.add(SUFFIXES.get(suffix, f"unknown suffix {suffix!r}"))
    if len(kinds) != 1 or any(k.startswith("unknown") for k in kinds):
        raise InputError(f"input: cannot tell the format from {sorted(kinds)}; set input.format")
    return kinds.pop()


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def shard_names(paths: list[str]) -> list[str]:
    """A stable, file-name-safe name per shard: the file stem, prefixed by its index where stems repeat."""
    stems = [re.sub(r"[^A-Za-z0-9_.-]", "_", Path(p.rstrip("/").split("?", 1)[0]).name.split(".")[0]) or "shard"
             for p in paths]
    repeated = {s for s in stems if stems.count(s) > 1}
    names = [f"{i:05d}-{s}" if s in repeated else s for i, s in enumerate(stems)]
    first: dict[str, str] = {}
    for path, name in zip(paths, names):  # '00001-a.tar' beside 'a.tar' and 'a.v2.tar': '00001-a' twice
        if name in first:
            raise InputError(f"input: shards {first[name]} and {path} would both be named {name!r} (the name "
                             "prefixes every uid); rename one of them")
        first[name] = path
    return names


_REMOTE_IDENTITY: dict[str, dict | None] = {}  # one look-up per remote shard and process


def input_identity(path: str) -> dict | None:
    """What says an input shard is still the one embedded: size and mtime (a local file), or the size and
    the ETag / modification time a remote filesystem reports. None when it cannot be told (unreachable)."""
    if not _is_url(path):
        try:
            st = os.stat(path[len("file://"):] if path.startswith("file://") else path)
        except OSError:
            return None
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path not in _REMOTE_IDENTITY:
        try:
            fs, url = fsspec.core.url_to_fs(path)
            info = fs.info(url)
        except Exception:  # noqa: BLE001 (any remote client's error: unknown, not changed)
            return None
        keys = ("size", "ETag", "etag", "LastModified", "last_modified", "mtime", "md5Hash", "crc32c")
        _REMOTE_IDENTITY[path] = {k: info[k] if k == "size" else str(info[k]) for k in keys if info.get(k) is not None}
    return _REMOTE_IDENTITY[path]


def input_change(path: str, recorded: dict | None) -> str | None:
    """How the input shard at ``path`` differs from its ``recorded`` identity ('size 100 -> 120 bytes',
    'modified since'), or None (the same, or it cannot be told: no record, or unreachable now)."""
    now = input_identity(path) if recorded else None
    if not now:
        return None
    if recorded.get("size") != now.get("size") and "size" in recorded and "size" in now:
        return f"size {recorded['size']} -> {now['size']} bytes"
    differ = [k for k in recorded if k != "size" and k in now and recorded[k] != now[k]]
    return f"modified since it was read ({differ[0]} changed)" if differ else None
