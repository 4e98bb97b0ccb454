"""Probe fits of an eval, cached by kept set, run in worker processes when they are many and large.

Every fit is seeded and single-threaded, so where it runs does not change its result; only the wall time."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..exec import die_with_parent
from ..io.files import clean_temp, temp_prefix
from .kd import KDSettings, cached_teacher_logits
from .probe import ProbeSettings, Teacher, fit_probe, standardise

POOL_MIN_ROWS = 5_000  # below this many training rows, workers cost more to start than they save
_WORKER: dict = {}


def _init_worker(folder: str, parent: int) -> None:
    die_with_parent(parent)  # a killed eval leaves no worker (~750 MB each) behind
    _WORKER["x"] = np.load(Path(folder) / "x.npy", mmap_mode="r")
    _WORKER["y"] = np.load(Path(folder) / "y.npy")


def _fit_rows(rows: np.ndarray, settings: ProbeSettings, teacher: Teacher | None):
    return fit_probe(np.asarray(_WORKER["x"][rows]), _WORKER["y"][rows], settings, teacher)


def default_workers(n_train: int) -> int:
    """Worker processes for ``workers=0`` (auto): one per CPU up to 2 for large evals, else none."""
    return min(2, os.cpu_count() or 1) if n_train >= POOL_MIN_ROWS else 1


class CurveFitter:
    """Probe fits over the training rows of one ``EvalData``, cached by kept set (and KD weight): curves that
    keep the same rows share one fit. ``correct(keep, alpha)`` is the held-out correctness vector;
    ``fit_many`` fits a batch of kept sets, in ``workers`` processes when there are several (0: auto).
    A KD fit reuses the L2 chosen for the same rows without KD when that fit came first, in job order,
    exactly as one fit after another would. Use as a context manager (or ``close()``) to stop the workers."""

    def __init__(self, data, probe: ProbeSettings, kd: KDSettings, run_dir: Path | None = None, workers: int = 0):
        self.train = np.flatnonzero(~data.test)
        self.x_train, self.x_test = standardise(data.embeddings[self.train], data.embeddings[data.test])
        self.y_train, self.y_test = data.labels[self.train], data.labels[data.test]
        self.probe, self.kd, self.cache, self.l2 = probe, kd, {}, {}
        self.workers = workers or default_workers(len(self.train))
        self._teacher, self._full_fit, self._data, self._run_dir = None, None, data, run_dir
        self._pool, self._folder, self._full = None, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    @property
    def full(self) -> np.ndarray:
        """Held-out correctness of the probe on every training row."""
        if self._full is None:
            self._full = self.correct(np.ones(len(self.train), bool))
        return self._full

    def teacher_logits(self) -> np.ndarray:
        if self._teacher is None:
            if self.kd.teacher == "cached":
                self._teacher = cached_teacher_logits(self._run_dir, self._data.uid[self.train],
                                                      self._data.label_coding)
            else:  # the full-data probe, fitted once for ``full``: the same fit, not a second one
                self.full  # noqa: B018 (fits it if nothing has yet)
                self._teacher = self._full_fit.logits(self.x_train)
        return self._teacher

    def correct(self, keep: np.ndarray, alpha: float = 0.0) -> np.ndarray:
        self.fit_many([(keep, alpha)])
        return self.cache[(_key(np.flatnonzero(keep)), alpha)]

    def fit_many(self, jobs, on_done=None) -> None:
        """Fit every ``(keep mask, alpha)`` not cached yet; ``on_done(n)`` counts the jobs as they finish."""
        on_done = on_done or (lambda n: None)
        plain, distil, count, has_l2 = {}, {}, {}, set(self.l2)
        for keep, alpha in jobs:
            rows = np.flatnonzero(keep)
            item = (_key(rows), float(alpha))
            count[item] = count.get(item, 0) + 1
            if item in self.cache or item in plain or item in distil:
                continue
            if alpha == 0:
                plain[item] = (rows, self.probe, None)
                has_l2.add(item[0])
            else:
                distil[item] = (rows, item[0] in has_l2)
        for item in [i for i in count if i in self.cache]:
            on_done(count.pop(item))
        self._run(plain, count, on_done)
        if distil:
            logits = self.teacher_logits()
            tasks = {}
            for (key, alpha), (rows, reuse) in distil.items():
                settings = self.probe
                if reuse:  # KD reuses the l2 chosen for the same rows without KD
                    settings = ProbeSettings(**{**asdict(self.probe), "l2_grid": (self.l2[key],)})
                tasks[(key, alpha)] = (rows, settings, Teacher(logits[rows], alpha, self.kd.T))
            self._run(tasks, count, on_done)

    def _run(self, tasks: dict, count: dict, on_done) -> None:
        if self.workers > 1 and len(tasks) > 1:
            pool = self._start()
            order = sorted(tasks, key=lambda item: -len(tasks[item][0]))  # largest first: the pool ends together
            futures = {item: pool.submit(_fit_rows, *tasks[item]) for item in order}
            for item, future in futures.items():
                self._store(item, tasks[item][0], future.result())
                on_done(count.pop(item, 0))
            return
        for item, (rows, settings, teacher) in tasks.items():
            self._store(item, rows, fit_probe(self.x_train[rows], self.y_train[rows], settings, teacher))
            on_done(count.pop(item, 0))

    def _store(self, item, rows: np.ndarray, fit) -> None:
        key, alpha = item
        if alpha == 0:
            self.l2[key] = fit.info["l2"] if fit.info["l2"] is not None else self.probe.l2_grid[0]
            if len(rows) == len(self.train):
                self._full_fit = fit
        self.cache[item] = fit.predict(self.x_test) == self.y_test

    def _start(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # in the run folder (else the temp dir), named for this process: the next eval removes a killed one's
            where = str(self._run_dir) if self._run_dir is not None else tempfile.gettempdir()
            clean_temp(where, ".eval-fits.p*.tmp")
            self._folder = tempfile.mkdtemp(prefix=temp_prefix("eval-fits"), suffix=".tmp", dir=where)
            np.save(Path(self._folder) / "x.npy", self.x_train)  # workers map it: one copy in memory
            np.save(Path(self._folder) / "y.npy", self.y_train)
            self._pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self._folder, os.getpid()))
        return self._pool


def _key(rows: np.ndarray) -> str:
    return hashlib.blake2b(rows.tobytes(), digest_size=20).hexdigest()
