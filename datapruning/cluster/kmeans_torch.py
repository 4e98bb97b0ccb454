"""Spherical k-means in torch (CUDA when present, CPU tensors otherwise) that follows faiss step by step.

Same init as ``faiss.Kmeans(spherical=True, seed=s)``: the first k entries of faiss's Mersenne-Twister
``rand_perm(n, s + 1)``; same loop (assign by inner product, mean update, faiss's empty-cluster split,
L2 renormalisation); same objective (sum of the best similarities before the last update). Assignment
is a chunked GEMM (tf32 or bf16 allowed on CUDA) whose argmax is then re-scored in fp32; the centroid
update is fp32 and deterministic: on CUDA, where ``index_add_`` uses atomics, the rows are sorted by cluster
and summed segment by segment (``segment_reduce``: one sequential sum per output element, O(n d) instead of
the O(n k d) of a one-hot GEMM, which cost more than the assignment itself at k = 16,384).
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import numpy as np
from ..errors import ClusterError

log = logging.getLogger(__name__)

SIM_BLOCK_BYTES = 256 << 20  # one [rows, k] float32 similarity block
SPLIT_EPS = 1 / 1024.0  # faiss's symmetric perturbation when an empty cluster takes half of another
PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError("cluster.backend=torch needs PyTorch: pip install torch") from exc
    return torch


class _MT19937:
    """std::mt19937 seeded like faiss's RandomGenerator (numpy's legacy seeding is the same init_genrand)."""

    def __init__(self, seed: int):
        self._rs = np.random.RandomState(int(seed) & 0xFFFFFFFF)
        self._buf = np.zeros(0, dtype=np.int64)

    def draws(self, n: int) -> np.ndarray:
        """The next ``n`` 32-bit outputs (consumed)."""
        out = self.peek(n)
        self._buf = self._buf[n:]
        return out

    def peek(self, n: int) -> np.ndarray:
        """The next ``n`` outputs without consuming them."""
        if len(self._buf) < n:
            more = self._rs.randint(0, 2 ** 32, size=n - len(self._buf), dtype=np.uint32).astype(np.int64)
            self._buf = np.concatenate([self._buf, more])
        return self._buf[:n]


def faiss_init_indices(n: int, k: int, seed: int) -> np.ndarray:
    """The rows faiss picks as initial centroids: ``rand_perm(n, seed + 1)[:k]`` (a partial Fisher-Yates)."""
    raw = _MT19937(seed + 1).draws(k)
    moved: dict[int, int] = {}
    out = np.empty(k, dtype=np.int64)
    for i in range(k):
        j = i + int(raw[i] % (n - i)) if i + 1 < n else i
        a, b = moved.get(i, i), moved.get(j, j)
        moved[i], moved[j] = b, a
        out[i] = b
    return out


def split_empty_clusters(counts: np.ndarray, centroids: np.ndarray, n: int) -> int:
    """faiss ``split_clusters``: each empty cluster copies a large one picked with probability
    ``(size - 1) / (n - k)`` (mt19937 seeded 1234, cyclic scan), both are perturbed by +-1/1024 and
    share its count. Works in place on float32 ``counts`` [k] and ``centroids`` [k, d]; returns the splits."""
    k, d = centroids.shape
    empty = np.flatnonzero(counts == 0)
    if len(empty) == 0:
        return 0
    mt = _MT19937(1234)  # one stream for the whole call, as in faiss
    denom = np.float32(n - k)
    sign = np.where(np.arange(d) % 2 == 0, np.float32(1), np.float32(-1)).astype(np.float32)
    for ci in empty:
        if counts[ci] != 0:
            continue
        p = ((counts.astype(np.float64) - 1.0) / denom).astype(np.float32)
        cj = -1
        while cj < 0:  # the scan restarts at cluster 0 and takes one uniform per cluster visited
            r = (mt.peek(k).astype(np.float32) / np.float32(4294967295.0)).astype(np.float32)
            hit = np.flatnonzero(r < p)
            mt.draws(int(hit[0]) + 1 if len(hit) else k)
            if len(hit):
                cj = int(hit[0])
        centroids[ci] = centroids[cj]
        centroids[ci] *= 1 + SPLIT_EPS * sign
        centroids[cj] *= 1 - SPLIT_EPS * sign
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
    return int(len(empty))


def _as_tensor(array: np.ndarray):
    """A read-only view (arrow-backed arrays are not writable; these tensors are never written)."""
    torch = _torch()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def resolve_device(device: str | None = None) -> str:
    torch = _torch()
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@contextmanager
def _matmul_precision(torch, precision: str, device: str):
    """tf32 for the assignment GEMM only (restored after); fp32 elsewhere."""
    if precision != "tf32" or not device.startswith("cuda"):
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _resolve_precision(precision: str, device: str) -> str:
    if precision not in PRECISIONS:
        raise ClusterError(f"torch k-means precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "tf32" if device.startswith("cuda") else "fp32"
    return precision  # tf32 only changes CUDA GEMMs; bf16 also runs (slowly) on CPU


def block_rows(k: int, budget: int = SIM_BLOCK_BYTES) -> int:
    return max(1, budget // (4 * max(1, k)))


def assign_block(x, centroids, c_low, precision: str):
    """Best centroid of each row of one block: (index int64, similarity float32 re-scored in fp32)."""
    torch = _torch()
    with _matmul_precision(torch, precision, str(x.device)):
        sims = (x.to(c_low.dtype) @ c_low.T) if c_low is not None else x @ centroids.T
    best = sims.argmax(dim=1)
    del sims
    sim = torch.einsum("ij,ij->i", x, centroids.index_select(0, best))
    return best, sim


def _low_precision(centroids, precision: str):
    return centroids.to(_torch().bfloat16) if precision == "bf16" else None


def _update(x, best, k: int, rows: int | None = None):
    """fp32 per-cluster sums [k, d] and counts [k]; deterministic on every device."""
    torch = _torch()
    counts = torch.bincount(best, minlength=k)
    if x.device.type == "cpu":
        return torch.zeros(k, x.shape[1], dtype=torch.float32).index_add_(0, best, x), counts.to(torch.float32)
    return segment_sums(x, best, counts), counts.to(torch.float32)


def segment_sums(x, best, counts):
    """Per-cluster row sums without atomics: a stable sort by cluster, then one sequential fp32 sum per
    (cluster, column) over that cluster's rows, in row order (same bits every run)."""
    torch = _torch()
    order = torch.sort(best, stable=True).indices
    return torch.segment_reduce(x.index_select(0, order), "sum", lengths=counts, axis=0)


def _renorm(c):
    torch = _torch()
    norms = torch.linalg.vector_norm(c, dim=1, keepdim=True)
    return torch.where(norms > 0, c * (1.0 / torch.where(norms > 0, norms, torch.ones_like(norms))), c)


def torch_kmeans(x: np.ndarray, k: int, niter: int, seed: int, device: str | None = None,
                 precision: str = "auto", early_stop: float = 0.0, init: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Spherical k-means centroids (float32 [k, d], unit norm) of ``x`` [n, d]; returns (centroids, stats).
    ``init``: the starting rows (default faiss's seeded pick). Stops early when the objective's relative change
    is at most ``early_stop`` (faiss's default 0.0: when it does not change at all)."""
    torch = _torch()
    device = resolve_device(device)
    precision = _resolve_precision(precision, device)
    x_np = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x_np.shape
    if k > n:
        raise ClusterError(f"torch k-means: k={k} is larger than the {n} points")
    xt = _as_tensor(x_np).to(device)
    if n == k:  # faiss copies the points and stops
        return x_np.copy(), {"objective": 0.0, "iterations": 0, "splits": 0, "device": device, "precision": precision}
    init = faiss_init_indices(n, k, seed) if init is None else np.asarray(init, dtype=np.int64)
    centroids = _renorm(xt.index_select(0, torch.from_numpy(init).to(device)))
    rows = block_rows(k)
    objective, splits, done = None, 0, 0
    for _ in range(niter):
        c_low = _low_precision(centroids, precision)
        best = torch.empty(n, dtype=torch.int64, device=device)
        obj = torch.zeros((), dtype=torch.float64, device=device)
        for s in range(0, n, rows):
            b, sim = assign_block(xt[s:s + rows], centroids, c_low, precision)
            best[s:s + rows] = b
            obj += sim.sum(dtype=torch.float64)
        previous, objective = objective, float(obj)
        sums, counts = _update(xt, best, k, rows)
        centroids = sums * (1.0 / torch.where(counts > 0, counts, torch.ones_like(counts)))[:, None]
        if bool((counts == 0).any()):
            c_np, n_np = centroids.cpu().numpy(), counts.cpu().numpy()
            splits += split_empty_clusters(n_np, c_np, n)
            centroids = torch.from_numpy(c_np).to(device)
        centroids = _renorm(centroids)
        done += 1
        if previous is not None and abs(objective - previous) <= early_stop * abs(previous):
            break  # as faiss 1.15 does: stop once the objective stops changing (after that update)
    out = centroids.cpu().numpy().astype(np.float32)
    return out, {"objective": objective or 0.0, "iterations": done, "splits": splits, "device": device,
                 "precision": precision}


def torch_assign(x: np.ndarray, centroids: np.ndarray, batch: int = 65536, device: str | None = None,
                 precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product: (cluster int64 [n], cos_dist float32 [n]). ``batch`` rows are
    copied to the device at a time and cut into similarity blocks there; results come back once per batch."""
    torch = _torch()
    device = resolve_device(device)
    precision = _resolve_precision(precision, device)
    c = _as_tensor(centroids).to(device)
    c_low = _low_precision(c, precision)
    n = len(x)
    cluster = np.empty(n, dtype=np.int64)
    cos_dist = np.empty(n, dtype=np.float32)
    rows = block_rows(len(c))
    step = max(int(batch), rows)
    for s in range(0, n, step):
        chunk = _as_tensor(x[s:s + step]).to(device)
        best = torch.empty(len(chunk), dtype=torch.int64, device=device)
        sim = torch.empty(len(chunk), dtype=torch.float32, device=device)
        for t in range(0, len(chunk), rows):
            best[t:t + rows], sim[t:t + rows] = assign_block(chunk[t:t + rows], c, c_low, precision)
        cluster[s:s + step] = best.cpu().numpy()
        cos_dist[s:s + step] = (1.0 - sim).cpu().numpy()
    return cluster, cos_dist
