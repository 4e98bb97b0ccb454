"""Executors: run a callable over work items in this process, a local process pool, or Ray tasks/actors.

They take plain callables (top-level functions, ``functools.partial`` of them) and import no stage. A
stage decides what one unit of work is (a shard, a group of clusters) and writes its own outputs and
done markers; an executor only runs the units and hands back each unit's small info dict. A command opens
one executor (``open_executor``) and passes it to every stage, so a pool or a Ray connection starts once.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Any, Callable, Iterable, Iterator

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Pool worker initializer: the worker is SIGKILLed when the process that started it dies (Linux prctl),
    so a killed run leaves no orphan writing into its folder; elsewhere a thread watches the parent."""
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A spawn process pool whose workers die with this process."""
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=die_with_parent,
                               initargs=(os.getpid(),))


POOL_AFTER_S = 1.0  # a pass whose items would take less than this in all runs here: a pool would cost more
POOL_AFTER_ENV = "DATAPRUNING_POOL_AFTER_S"  # overrides it (0: start the pool at the first pass of several items)


class Executor:
    """Runs a callable over work items, results as they finish: here, in this process (``workers: 1``).

    One executor serves a whole command (``open_executor``): stages get it from ``Run.executor`` and never
    start their own."""

    in_process = True  # every item runs in this process (a stage may then overlap reading and computing)

    def map_unordered(self, fn: Callable[[Any], Any], items: Iterable, resources: dict | None = None) -> Iterator:
        for item in items:
            yield fn(item)

    def map_with_setup(self, setup: Callable[[], Any], process: Callable[[Any, Any], Any], items: Iterable,
                       resources: dict | None = None, slots: int = 1) -> Iterator:
        """``process(state, item)`` for every item, where ``state = setup()`` is built once per worker (a model)."""
        items = list(items)
        if not items:
            return
        state = setup()
        for item in items:
            yield process(state, item)

    def call(self, fn: Callable, args: tuple, resources: dict | None = None):
        """``fn(*args)``, here or as one remote task."""
        return fn(*args)

    def close(self) -> None:
        pass


class PoolExecutor(Executor):
    """A spawn process pool of ``workers``, started once, by the first pass whose work pays for it, and kept for the
    command. Until then a pass runs its first item here and goes on here when all of its items would take less
    than ``POOL_AFTER_S`` (a 600-row run never starts the pool; a run of 50,000-row shards does at once)."""

    in_process = False

    def __init__(self, workers: int):
        self.workers, self._pool = int(workers), None
        self.after_s = float(os.environ.get(POOL_AFTER_ENV, POOL_AFTER_S))

    def map_unordered(self, fn, items, resources=None) -> Iterator:
        items = list(items)
        if self._pool is None:
            if len(items) <= 1:
                yield from super().map_unordered(fn, items)
                return
            if self.after_s > 0:
                start = time.perf_counter()
                yield fn(items[0])
                items = items[1:]
            if self.after_s > 0 and (time.perf_counter() - start) * len(items) < self.after_s:
                yield from super().map_unordered(fn, items)
                return
            self._pool = process_pool(self.workers)
        for fut in as_completed([self._pool.submit(fn, item) for item in items]):
            yield fut.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor(Executor):
    """Ray tasks (``resources`` each, default one CPU) and model-holding actors on ``cfg.ray``'s cluster."""

    in_process = False

    def __init__(self, cfg):
        self.cfg = cfg

    def map_unordered(self, fn, items, resources=None) -> Iterator:
        from .ray import map_tasks

        items = list(items)
        if items:
            yield from map_tasks(fn, items, self.cfg, resources or {"num_cpus": 1})

    def map_with_setup(self, setup, process, items, resources=None, slots=1) -> Iterator:
        from .ray import map_actors

        items = list(items)
        if items:
            yield from map_actors(setup, process, items, self.cfg, resources or {"num_cpus": 1}, slots)

    def call(self, fn, args, resources=None):
        from .ray import run_task

        return run_task(fn, args, self.cfg, resources or {"num_cpus": 1})


@contextmanager
def open_executor(cfg) -> Iterator[Executor]:
    """The command's one executor, from ``cfg.backend`` and ``cfg.workers``; closed (the pool stopped) at exit."""
    ex = RayExecutor(cfg) if cfg.backend == "ray" else PoolExecutor(cfg.workers) if cfg.workers > 1 else Executor()
    try:
        yield ex
    finally:
        ex.close()
