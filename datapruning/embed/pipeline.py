"""The embed chain for one tar shard: samples -> decode -> batch -> encode -> write, one small generator each.

Written in webdataset's style: every step takes an iterator and returns one. The tar is read on its own
thread (``prefetched``), batches are decoded on ``embed.decode_workers`` threads up to ``embed.prefetch``
batches ahead each (``ahead``), and the model runs on the calling thread. The decode step (``decoders``) is
the only part that differs between the PIL, tensor (nvjpeg) and DALI paths; the row bookkeeping (uids, skip
reasons, counts) is ``accounted`` and ``gather``, written once.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .samples import ROW_NAMES, caption, json_fields, text_field, write_shard
from ..io.tables import label_text
from ..io.webdataset import iter_tar_samples, skip

log = logging.getLogger(__name__)

SORT_WINDOW_BATCHES = 64  # length-sorted encoders: sort up to this many batches at once (a usual shard whole)


@dataclass
class Decoded:
    """One decoded batch, in sample order: ``metas`` (the ``ROW_NAMES`` values of each sample), ``reasons``
    (why a sample cannot be embedded, None for a good one), ``inputs`` (the encoder's input for the good
    samples: a list, or a [B, ...] tensor on the device; None when none is good), ``texts`` (embed.modality
    pair: the good samples' captions), ``ready`` (a CUDA event ``inputs`` wait on, made on a decode stream)."""

    metas: list
    reasons: list
    inputs: Any = None
    texts: list | None = None
    ready: Any = None
    good: list = field(default_factory=list)  # metas of the good samples, filled by ``accounted``


def tar_samples(path: str, shard: str, skipped: Counter, strict: bool, fast: bool) -> Iterator[dict]:
    """Samples ``{"__key__": key, ext: bytes}`` of one tar (repeated keys and broken members counted);
    ``fast``: ``io.tarstream``'s parser, falling back to tarfile."""
    return iter_tar_samples(path, shard, skipped, strict, fast=fast)


def with_meta(samples: Iterable[dict], icfg, shard: str, captions: bool) -> Iterator[tuple[tuple, dict]]:
    """(row values in ``ROW_NAMES`` order, sample): uid, shard, key, label, caption (when ``captions``), and
    the ``.json``'s source uid and original image size."""
    for sample in samples:
        key = sample["__key__"]  # unique: the reader counts and drops repeated keys
        label = label_text(text_field(sample.get(icfg.label_key)))
        text = caption(sample, icfg.text_keys) if captions else None
        yield (f"{shard}/{key}", shard, key, label, text, *json_fields(sample)), sample


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _End:
    """End of a ``prefetched`` stream, or the producer's exception."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


def prefetched(items: Iterable, depth: int) -> Iterator:
    """``items`` produced on a background thread, up to ``depth`` ahead; its exceptions re-raised here. Closing
    this generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(_End())
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_End(exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def ahead(fn: Callable, items: Iterable, workers: int, depth: int) -> Iterator:
    """``fn(item)`` for each item, in order, on ``workers`` threads with up to ``workers * depth`` results
    in flight; ``workers`` 0 runs ``fn`` on this thread."""
    if workers <= 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers)
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * max(1, depth):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def accounted(batches: Iterable[Decoded], shard: str, skipped: Counter, strict: bool) -> Iterator[Decoded]:
    """Count (or, in strict mode, raise) every sample a decode step could not use; ``good`` keeps the rest."""
    for b in batches:
        for meta, reason in zip(b.metas, b.reasons):
            if reason is None:
                b.good.append(meta)
            else:
                skip(skipped, reason, shard, meta[2], reason.replace("_", " "), strict)
        yield b


def encode_sorted(encoder, items: list, batch_size: int) -> np.ndarray:
    """Embed ``items`` in batches of similar ``encoder.length`` (longest first, as sentence-transformers does),
    less padding than file order; the rows come back in the order of ``items``."""
    order = np.argsort([-encoder.length(x) for x in items], kind="stable")
    parts = [encoder.forward([items[i] for i in order[s:s + batch_size]]) for s in range(0, len(items), batch_size)]
    out = np.empty((len(items), parts[0].shape[1]), np.float32)
    out[order] = np.concatenate(parts)
    return out


def encoded(batches: Iterable[Decoded], encoder, batch_size: int, timing: dict) -> Iterator[tuple]:
    """(metas, embeddings, caption embeddings or None) per model call, in file order. A length-sorted encoder
    embeds windows of ``SORT_WINDOW_BATCHES`` batches, sorted by length within each; ``timing`` adds up the
    seconds the model thread waited for decoded batches and spent encoding."""
    window = batch_size * SORT_WINDOW_BATCHES if encoder.length else 0
    metas, items = [], []
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        b = next(it, None)
        t1 = time.perf_counter()
        timing["wait"] += t1 - t0
        if b is None:
            break
        if b.good and window:
            metas, items = metas + b.good, items + list(b.inputs)
            if len(items) >= window:
                yield metas, encode_sorted(encoder, items, batch_size), None
                metas, items = [], []
        elif b.good:
            if b.ready is not None:  # made on a decode stream, read on this one: wait for it, keep it from early reuse
                import torch

                stream = torch.cuda.current_stream(b.inputs.device)
                stream.wait_event(b.ready)
                b.inputs.record_stream(stream)
            texts = encoder.text.embed(b.texts) if encoder.text is not None else None
            yield b.good, encoder.embed(b.inputs), texts
        timing["busy"] += time.perf_counter() - t1
    if items:
        yield metas, encode_sorted(encoder, items, batch_size), None


def host(chunks: list) -> np.ndarray | None:
    """Concatenated float32 rows on the host (one copy from the device at the end)."""
    if not chunks:
        return None
    if isinstance(chunks[0], np.ndarray):
        return np.concatenate(chunks).astype(np.float32, copy=False)
    import torch

    return torch.cat(chunks).cpu().numpy().astype(np.float32)


def gather(calls: Iterable[tuple]) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """The rows (``ROW_NAMES`` columns, file order), embeddings and caption embeddings (pairs; else None) of
    the encoded model calls."""
    rows = {name: [] for name in ROW_NAMES}
    chunks, text_chunks = [], []
    for metas, emb, text_emb in calls:
        for meta in metas:
            for name, value in zip(ROW_NAMES, meta):
                rows[name].append(value)
        chunks.append(emb)
        if text_emb is not None:
            text_chunks.append(text_emb)
    matrix = host(chunks)
    if not any(v is not None for v in rows["text"]):
        rows.pop("text")
    return rows, np.zeros((0, 1), np.float32) if matrix is None else matrix, host(text_chunks)


def embed_chain(cfg, path: str, shard: str, out_dir: Path, encoder, decode: Callable[[list], Decoded],
                name: str = "pil", fast: bool = False, source: dict | None = None) -> dict:
    """One tar shard through the chain with the decode step ``decode`` (named ``name`` in the log); ``fast``
    reads the tar with ``io.tarstream`` (the GPU paths, where one Python thread must keep up with the GPU)."""
    ecfg, read_skipped, skipped = cfg.embed, Counter(), Counter()  # one counter per thread, merged at the end
    depth = max(1, ecfg.prefetch)
    stream = with_meta(tar_samples(path, shard, read_skipped, cfg.strict, fast), cfg.input, shard,
                       captions=ecfg.modality != "text")
    stream = prefetched(batched(stream, ecfg.batch_size), depth)
    stream = accounted(ahead(decode, stream, ecfg.decode_workers, depth), shard, skipped, cfg.strict)
    timing = {"wait": 0.0, "busy": 0.0}
    calls = encoded(stream, encoder, ecfg.batch_size, timing)
    try:
        rows, matrix, text_matrix = gather(calls)
    finally:
        calls.close()  # stops the reader and decode threads when a step raised
        stream.close()
    skipped.update(read_skipped)
    info = write_shard(cfg, out_dir, shard, rows, matrix, skipped, encoder.name, text_matrix=text_matrix,
                       source=source)
    log.info("embed %s: %s decode on %s, model busy %.2fs, waited for decode %.2fs", shard, name,
             encoder.device, timing["busy"], timing["wait"])
    return {**info, "model_busy_s": round(timing["busy"], 3), "model_wait_s": round(timing["wait"], 3)}
