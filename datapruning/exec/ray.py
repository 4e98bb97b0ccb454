"""The Ray executor: tasks, model-holding actors and single remote calls, for any callable.

Workers read input shards through fsspec (any URL the driver can name) and write into the run folder, so
on a multi-machine cluster OUTPUT must be a path every node sees (NFS, a mounted bucket).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from ..errors import StageError

log = logging.getLogger("datapruning")


def ray_module():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("backend: ray needs Ray: pip install 'ray[default]' (or pip install 'datapruning[ray]')") from exc
    return ray


CONNECT_TIMEOUT_S = 5.0  # an address that does not answer this fast is refused (Ray itself retries for minutes)


def ensure_ray(cfg):
    """Connect to ``ray.address`` (or start a local instance) unless Ray is already initialised. An address
    whose port does not answer, or a Ray that cannot start, is one line (StageError), not minutes of retries."""
    ray = ray_module()
    if not ray.is_initialized():
        # no address: a new local instance ("local"), never a cluster some other job started on this machine
        address = cfg.ray.address or "local"
        kwargs = {"address": address, "log_to_driver": True}
        if cfg.ray.address is None and cfg.ray.num_cpus is not None:
            kwargs["num_cpus"] = cfg.ray.num_cpus  # only for a new local instance: Ray refuses it when connecting
        if address not in ("local", "auto"):
            check_reachable(address)
        log.info("ray: %s", f"connecting to {cfg.ray.address}" if cfg.ray.address else "starting a local instance")
        try:
            ray.init(**kwargs)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            raise StageError(f"ray: cannot {'connect to ' + address if cfg.ray.address else 'start a local instance'} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); check "
                             "ray.address, or that 'ray start --head' runs there") from None
    return ray


def check_reachable(address: str) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) whose port does not accept a TCP connection in
    ``CONNECT_TIMEOUT_S``."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise StageError(f"ray.address {address}: nothing answers there ({exc.strerror or type(exc).__name__}); "
                         "start the cluster ('ray start --head') or fix ray.address") from None


def cluster_gpus(cfg) -> float:
    return float(ensure_ray(cfg).cluster_resources().get("GPU", 0.0))


def cluster_cpus(cfg) -> int:
    return max(1, int(ensure_ray(cfg).cluster_resources().get("CPU", 1)))


def largest_node_cpus(cfg) -> int:
    cpus = [n.get("Resources", {}).get("CPU", 0) for n in ensure_ray(cfg).nodes() if n.get("Alive")]
    return max(1, int(max(cpus, default=1)))


def _unwrap(ray, fn, *args):
    """``fn(*args)``, re-raising a failed task's own exception (one-line CLI errors keep working)."""
    try:
        return fn(*args)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError, ray.exceptions.NodeDiedError) as exc:
        raise StageError(f"ray: a worker died running a unit more often than ray.retries allows ({type(exc).__name__})"
                         "; rerun to resume (finished units are kept), or raise ray.retries") from None


def _drain(ray, pending: dict) -> Iterator[tuple]:
    """Wait for one finished call; yields (key, result)."""
    done, _ = ray.wait(list(pending), num_returns=1)
    for ref in done:
        key = pending.pop(ref)
        yield key, _unwrap(ray, ray.get, ref)


def _apply(fn: Callable, item):
    import ray

    return ray.get_runtime_context().get_node_id(), fn(item)


def map_tasks(fn: Callable, items: list, cfg, resources: dict) -> Iterator:
    """One Ray task per item, at most twice the cluster's CPUs in flight; results as they finish. Logs how
    many nodes ran them. A task whose worker died (killed, out of memory, its node lost) runs again, up to
    ``ray.retries`` times: units write through temporary files and done markers, so a rerun is idempotent."""
    ray = ensure_ray(cfg)
    # SPREAD: shard work goes to every node rather than filling the driver's node first
    task = ray.remote(max_retries=cfg.ray.retries, scheduling_strategy="SPREAD", **resources)(_apply)
    fn_ref = ray.put(fn)
    window = max(2, 2 * cluster_cpus(cfg))
    pending: dict = {}
    nodes: set = set()
    for item in items:
        pending[task.remote(fn_ref, item)] = None
        while len(pending) >= window:
            for _, (node, result) in _drain(ray, pending):
                nodes.add(node)
                yield result
    while pending:
        for _, (node, result) in _drain(ray, pending):
            nodes.add(node)
            yield result
    log.info("ray: %d tasks of %s ran on %d nodes", len(items), getattr(fn, "func", fn).__name__, len(nodes))


class _Worker:
    """One actor: ``setup`` builds the state once (a model on its GPU), ``process`` runs item after item. An
    actor restarted after its process died builds its state again on its first item."""

    def __init__(self, setup: Callable, process: Callable):
        self.setup_fn, self.process_fn, self.state = setup, process, None

    def setup(self) -> str:
        if self.state is None:
            self.state = self.setup_fn()
        return str(getattr(self.state, "name", type(self.state).__name__))

    def process(self, item):
        self.setup()
        return self.process_fn(self.state, item)

    def teardown(self) -> None:
        self.state = None


def map_actors(setup: Callable, process: Callable, items: list, cfg, resources: dict, slots: int) -> Iterator:
    """``slots`` actors with ``resources`` each; every actor builds its state once, then takes items."""
    ray = ensure_ray(cfg)
    actor_cls = ray.remote(max_restarts=cfg.ray.retries, max_task_retries=cfg.ray.retries, **resources)(_Worker)
    actors = [actor_cls.remote(setup, process) for _ in range(max(1, min(slots, len(items))))]
    try:
        names = _unwrap(ray, ray.get, [a.setup.remote() for a in actors])
        log.info("ray: %d actors (%s) with %s", len(actors), resources, names[0])
        queue, pending = list(items), {}
        for actor in actors:
            if queue:
                pending[actor.process.remote(queue.pop(0))] = actor
        while pending:
            for actor, result in _drain(ray, pending):
                yield result
                if queue:
                    pending[actor.process.remote(queue.pop(0))] = actor
        ray.get([a.teardown.remote() for a in actors])
    finally:
        for actor in actors:
            ray.kill(actor)


def run_task(fn: Callable, args: tuple, cfg, resources: dict) -> Any:
    """``fn(*args)`` as one Ray task with ``resources``, run again if its worker dies (``ray.retries``)."""
    ray = ensure_ray(cfg)
    task = ray.remote(max_retries=cfg.ray.retries, **resources)(fn)
    return _unwrap(ray, ray.get, task.remote(*args))
