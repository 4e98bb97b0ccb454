"""Executors: run a callable over work items in this process, a local process pool, or Ray tasks/actors.

They take plain callables (top-level functions, ``functools.partial`` of them) and import no stage. A
stage decides what one unit of work is (a shard, a group of clusters) and writes its own outputs and
done markers; an executor only runs the units and hands back each unit's small info dict.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
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


def map_unordered(fn: Callable[[Any], Any], items: Iterable, cfg, resources: dict | None = None) -> Iterator:
    """``fn(item)`` for every item, results yielded as they finish (any order).

    ``cfg.backend`` picks the executor: ``local`` runs in this process (``cfg.workers <= 1``) or a spawn
    process pool of ``cfg.workers``; ``ray`` runs one Ray task per item with ``resources`` (default one CPU).
    """
    items = list(items)
    if not items:
        return
    if cfg.backend == "ray":
        from .ray import map_tasks

        yield from map_tasks(fn, items, cfg, resources or {"num_cpus": 1})
    elif cfg.workers <= 1 or len(items) == 1:
        for item in items:
            yield fn(item)
    else:
        with process_pool(min(cfg.workers, len(items))) as pool:
            for fut in as_completed([pool.submit(fn, item) for item in items]):
                yield fut.result()


def map_with_setup(setup: Callable[[], Any], process: Callable[[Any, Any], Any], items: Iterable, cfg,
                   resources: dict | None = None, slots: int = 1) -> Iterator:
    """``process(state, item)`` for every item, where ``state = setup()`` is built once per worker (a model).

    Locally the state is built once in this process. On Ray, ``slots`` actors with ``resources`` each
    build their own state, then take items from a shared queue until none is left (NeMo Curator's
    setup/process/teardown lifecycle)."""
    items = list(items)
    if not items:
        return
    if cfg.backend == "ray":
        from .ray import map_actors

        yield from map_actors(setup, process, items, cfg, resources or {"num_cpus": 1}, slots)
        return
    state = setup()
    for item in items:
        yield process(state, item)


def call(fn: Callable, args: tuple, cfg, resources: dict | None = None):
    """``fn(*args)`` here, or as one Ray task with ``resources`` on ``backend: ray``."""
    if cfg.backend == "ray":
        from .ray import run_task

        return run_task(fn, args, cfg, resources or {"num_cpus": 1})
    return fn(*args)
