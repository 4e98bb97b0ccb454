"""Shared pieces of the benchmarks: seeded embedding shards, peak RSS from /proc, child runs, reports."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def scratch(workdir: str | None, prefix: str):
    """The benchmark's folder: ``workdir`` when given (kept), else a temporary one removed afterwards."""
    work = Path(workdir or tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), from /proc; ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mixture(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float, dup_fraction: float) -> tuple:
    """n unit vectors around random ``centres`` (ids returned), a ``dup_fraction`` of them near-copies
    (1e-3 noise) of earlier rows of the same block, so SemDeDup has duplicates to find."""
    ids = rng.integers(len(centres), size=n)
    x = centres[ids] + spread * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    n_dup = int(dup_fraction * n)
    if n_dup and n > 1:
        dst = rng.choice(np.arange(1, n), size=min(n_dup, n - 1), replace=False)
        src = (rng.random(len(dst)) * dst).astype(np.int64)  # an earlier row
        x[dst] = x[src] + 1e-3 * rng.standard_normal((len(dst), x.shape[1]), dtype=np.float32)
        ids[dst] = ids[src]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32, copy=False), ids


def make_centres(k: int, d: int, seed: int) -> np.ndarray:
    c = np.random.default_rng(seed).standard_normal((k, d), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


COPY_SOURCES = 1  # distinct rows the exact copies repeat (web data: a placeholder image): one huge cluster


def long_tail_labels(rng: np.random.Generator, n: int, classes: int, start: int, head: int = 50,
                     every: int = 5) -> np.ndarray:
    """Labels of rows ``start .. start+n-1``: every ``every``-th row (20%) in the tail, spread evenly over classes
    ``head .. classes-1`` (the same few rows each, so a balanced selection cuts only the head classes: the
    issue's shape), the other 80% at random in the first ``head`` classes."""
    pos = np.arange(start, start + n)
    tail = pos % every == 0
    return np.where(tail, head + (pos // every) % (classes - head), rng.integers(head, size=n))


def write_embedding_shards(folder: Path, n: int, d: int, shards: int, k_true: int, seed: int = 0,
                           spread: float = 0.04, dup_fraction: float = 0.1, exact_copies: float = 0.0,
                           classes: int | None = None) -> list[Path]:
    """Precomputed-embedding parquet shards (uid, embedding fixed_size_list<float32>, label), written one
    shard at a time so the writer never holds the whole matrix. ``exact_copies``: that share of every shard's
    rows are bit-identical copies of ``COPY_SOURCES`` rows (k-means cannot split copies: one huge cluster);
    ``classes``: long-tailed labels over that many classes instead of the true centre ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    centres = make_centres(k_true, d, seed)
    sources = mixture(np.random.default_rng([seed, 1 << 30]), centres[:1], COPY_SOURCES, spread, 0.0)[0]
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    paths = []
    for s in range(shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        rng = np.random.default_rng([seed, s])
        x, ids = mixture(rng, centres, hi - lo, spread, dup_fraction)
        copies = rng.random(hi - lo) < exact_copies
        x[copies] = sources[rng.integers(COPY_SOURCES, size=int(copies.sum()))]
        ids[copies] = 0
        if classes:
            ids = long_tail_labels(rng, hi - lo, classes, lo)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
        table = pa.table({"uid": pa.array([f"id{i:09d}" for i in range(lo, hi)]), "embedding": emb,
                          "label": pa.array(ids.astype(np.int64))})
        path = folder / f"part-{s:05d}.parquet"
        pq.write_table(table, path, compression="zstd")
        paths.append(path)
    return paths


def read_matrix(paths: list[Path]) -> np.ndarray:
    """All shards' embeddings in one preallocated float32 matrix (what a bare script would hold)."""
    import pyarrow.parquet as pq

    n = sum(pq.read_metadata(p).num_rows for p in paths)
    out, offset = None, 0
    for p in paths:
        col = pq.read_table(p, columns=["embedding"])["embedding"].combine_chunks()
        block = np.asarray(col.flatten().to_numpy(), dtype=np.float32).reshape(len(col), -1)
        if out is None:
            out = np.empty((n, block.shape[1]), dtype=np.float32)
        out[offset:offset + len(block)] = block
        offset += len(block)
    return out


def real_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` real English texts, offline: WordNet glosses of the ImageNet-21k synsets (21,844, 4 to 117 MiniLM
    tokens, median 15), as timm ships them (timm comes with open_clip_torch); a seeded sample, file order mixed."""
    import timm

    lines = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synset_to_definition.txt").read_text("utf-8")
    texts = [line.split("\t", 1)[1].strip() for line in lines.splitlines() if "\t" in line]
    if n > len(texts):
        raise ValueError(f"{n} texts asked for, {len(texts)} available")
    return [texts[i] for i in np.random.default_rng(seed).choice(len(texts), size=n, replace=False)]


def write_tar_shards(folder: Path, count: int, shards: int, members) -> None:
    """``shards`` webdataset tars of samples ``0..count-1`` split evenly in order; ``members(i)`` gives sample
    i's ``(ext, bytes)`` pairs, stored as ``{i:08d}.{ext}``."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-count // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per, min(count, (s + 1) * per)):
                for ext, data in members(i):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


class ChildFailed(RuntimeError):
    """A child process exited with an error (the message ends with its stderr's last lines)."""


def run_child(argv: list[str], env: dict | None = None, timeout: float = 3600, max_vm_bytes: int | None = None) -> dict:
    """Run ``python argv...`` in a fresh process; its last stdout line is a JSON dict, returned with
    the child's wall time and peak RSS (wait4's ru_maxrss, beside the child's own VmHWM). ``max_vm_bytes``
    caps the child's address space (RLIMIT_AS), so a runaway allocation fails in the child instead of
    pressing on a shared machine's memory."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (max_vm_bytes, max_vm_bytes))

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, cwd=REPO, preexec_fn=cap if max_vm_bytes else None)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.returncode != 0:
        raise ChildFailed(f"child {argv[:3]} failed ({proc.returncode}):\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1])
    result.setdefault("wall_s", round(time.perf_counter() - start, 3))
    return result


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        model = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        info["cpu"] = model[0].split(":", 1)[1].strip() if model else platform.processor()
        mem = [l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")]
        info["memory_gib"] = round(int(mem[0].split()[1]) / 2 ** 20, 1)
    except (OSError, IndexError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def report(name: str, result: dict, json_path: str | None) -> None:
    """Print the result as one JSON line (children and tests parse it) and write it to ``json_path``."""
    result = {"benchmark": name, "machine": machine(), **result}
    text = json.dumps(result, sort_keys=True, default=float)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1, sort_keys=True, default=float) + "\n")
    print(text, flush=True)


def mib(n_bytes: float) -> float:
    return round(n_bytes / 2 ** 20, 1)
