"""Tensor image path for open_clip image encoders: batched JPEG decode, resize, crop, normalise as tensors.

Decoding is nvjpeg on CUDA (libjpeg on CPU) on background threads, so the model does not wait; the
preprocessing math is ``embed.preprocess``. Chosen by ``embed.image_decode``: ``auto`` uses it when the
encoder runs on CUDA, ``tensor`` forces it (also on CPU), ``pil`` keeps the PIL path with its thread pool.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from .preprocess import PreprocessSpec, preprocess_images, spec_from_transform
from ..errors import BadSample

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
PREFETCH = 3  # batches decoded ahead of the model, per decode thread
DECODE_THREADS = 2  # decode threads, each on its own CUDA stream (batches dealt round robin, order kept);
# 0 decodes on the model's thread (the GPU still overlaps: the model runs while the next batch decodes)
CPU_DECODE_SHARE = 0.0  # share of each batch's JPEGs decoded by libjpeg on CPU threads beside nvjpeg
CPU_DECODE_WORKERS = 8




def _pil_to_tensor(data: bytes):
    """The PIL route for what nvjpeg cannot take (PNG, WebP, odd JPEGs): uint8 [3, H, W] on CPU."""
    import io

    import torch
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"))
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise BadSample("corrupt_image") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _decode_jpegs(raw: list, device: str) -> list:
    """One batched ``decode_jpeg`` call; when it rejects the batch (one bad file fails it all), one by one.
    Items are uint8 [3, H, W] tensors on ``device`` or None."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for r in raw:
            try:
                out.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def _cpu_jpeg(r):
    """libjpeg on a CPU thread (releases the GIL), into pinned memory for an asynchronous copy."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(r, mode=ImageReadMode.RGB).pin_memory()
    except RuntimeError:
        return None


def decode_images(datas: list[bytes], device: str, cpu_pool=None, cpu_share: float = 0.0) -> list:
    """Decode a batch: JPEGs in one batched ``decode_jpeg`` call on ``device``, the rest (and any JPEG
    the batch call rejects) one by one, falling back to PIL. With ``cpu_pool``, the last ``cpu_share`` of
    the JPEGs are decoded by libjpeg on its threads meanwhile. Items are uint8 [3, H, W] tensors on
    ``device``, or the reason string for a sample that cannot be decoded."""
    import torch

    out: list = [None] * len(datas)
    jpeg = [i for i, d in enumerate(datas) if d[:3] == JPEG_MAGIC]
    with warnings.catch_warnings():  # read-only bytes: nothing writes to these tensors
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        raw = {i: torch.frombuffer(datas[i], dtype=torch.uint8) for i in jpeg}
    n_cpu = int(len(jpeg) * cpu_share) if cpu_pool is not None and device.startswith("cuda") else 0
    on_cpu = jpeg[len(jpeg) - n_cpu:] if n_cpu else []
    futures = [(i, cpu_pool.submit(_cpu_jpeg, raw[i])) for i in on_cpu]
    on_dev = jpeg[:len(jpeg) - n_cpu]
    if on_dev:
        for i, img in zip(on_dev, _decode_jpegs([raw[i] for i in on_dev], device)):
            out[i] = img
    for i, fut in futures:  # copied on this thread's (the decode) stream, so ordered before the resize
        img = fut.result()
        out[i] = None if img is None else img.to(device, non_blocking=True)
    for i, img in enumerate(out):
        if img is None:
            try:
                out[i] = _pil_to_tensor(datas[i]).to(device, non_blocking=True)
            except ValueError as exc:
                out[i] = str(exc)
    return out


class _Stop:
    """End of stream marker (or the producer's exception) on the queues."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless the consumer has stopped (then give up instead of blocking forever)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return _Stop()


def _read_batches(cfg, path: str, shard: str, skipped: Counter, outs: list, stop: threading.Event):
    """Reader thread: tar samples -> batches of (meta, image bytes or reason) in sample order, dealt round
    robin to the decode threads' queues ``outs``; then an end marker to each."""
    from ..io.webdataset import iter_tar_samples, skip
    from ..io.tables import label_text
    from .samples import caption, source_uid, text_field

    icfg, batch, seen, n = cfg.input, [], set(), 0
    try:
        for sample in iter_tar_samples(path, shard, skipped, cfg.strict, fast=True):
            key = sample["__key__"]
            if key in seen:
                skip(skipped, "duplicate_key", shard, key, "key repeats within the shard", cfg.strict)
                continue
            seen.add(key)
            meta = (f"{shard}/{key}", shard, key, label_text(text_field(sample.get(icfg.label_key))),
                    caption(sample, icfg.text_keys), source_uid(sample))
            ext = next((k for k in icfg.image_keys if k in sample), None)
            batch.append((meta, sample[ext] if ext else "missing_image"))
            if len(batch) >= cfg.embed.batch_size:
                if not _put(outs[n % len(outs)], batch, stop):
                    return
                batch, n = [], n + 1
        if batch:
            _put(outs[n % len(outs)], batch, stop)
            n += 1
        for j in range(len(outs)):
            _put(outs[(n + j) % len(outs)], _Stop(), stop)
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
        for j in range(len(outs)):
            _put(outs[(n + j) % len(outs)], _Stop(exc), stop)


def _decode_one(spec, device: str, batch: list, stream, cpu_pool=None):
    """One byte batch -> (metas, reasons, model input, ready event), the GPU work queued on ``stream``."""
    import torch

    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        datas = [d for _, d in batch if isinstance(d, bytes)]
        decoded = iter(decode_images(datas, device, cpu_pool, CPU_DECODE_SHARE))
        items = [next(decoded) if isinstance(d, bytes) else d for _, d in batch]
        good = [t for t in items if not isinstance(t, str)]
        x = preprocess_images(good, spec) if good else None
        ready = torch.cuda.Event() if stream is not None else None
        if ready is not None:
            ready.record(stream)
    reasons = [t if isinstance(t, str) else None for t in items]
    return [m for m, _ in batch], reasons, x, ready


def _decode_batches(spec, device: str, inp: queue.Queue, out: queue.Queue, stop: threading.Event, cpu_pool=None):
    """Decode thread: byte batches -> (metas, reasons, model input, ready event) on its own CUDA stream.
    The model's stream waits on the event instead of this thread blocking until the batch is done."""
    import torch

    stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
    try:
        while True:
            batch = _get(inp, stop)
            if isinstance(batch, _Stop):
                _put(out, batch, stop)
                return
            if not _put(out, _decode_one(spec, device, batch, stream, cpu_pool), stop):
                return
    except BaseException as exc:  # noqa: BLE001
        _put(out, _Stop(exc), stop)


def _forward(encoder, x):
    """``Encoder.forward`` without its copy to the host: L2-normalised float32 rows left on the device, so
    the next batch is queued before this one finishes."""
    import torch

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
        out = encoder.forward_fn(list(x)).float()
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def tensor_decode_spec(cfg, encoder) -> PreprocessSpec | None:
    """The preprocess spec when this shard should take the tensor path, else None (PIL path)."""
    mode = getattr(cfg.embed, "image_decode", "auto")
    if mode == "pil":
        return None
    is_clip_image = cfg.embed.encoder == "open_clip" and cfg.embed.modality == "image"
    spec = spec_from_transform(encoder.prepare) if is_clip_image else None
    if mode == "tensor" and spec is None:
        from ..errors import EncoderError

        raise EncoderError("embed.image_decode=tensor needs an open_clip image encoder whose preprocess is "
                           "Resize/CenterCrop/Normalize; set embed.image_decode=auto or pil")
    if mode == "auto" and not str(encoder.device).startswith("cuda"):
        return None
    return spec


def embed_tar_shard_tensors(cfg, path: str, shard: str, out_dir: Path, encoder, spec: PreprocessSpec,
                            source: dict | None = None) -> dict:
    """``embed_tar_shard`` on the tensor path: a reader thread and a decode thread run ahead of the model."""
    import torch

    from ..io.webdataset import skip
    from .samples import ROW_NAMES, write_shard

    device = str(encoder.device)
    skipped, read_skipped = Counter(), Counter()  # one counter per thread, merged at the end
    rows = {name: [] for name in ROW_NAMES}
    chunks: list = []
    n_dec = max(1, DECODE_THREADS)
    inline = DECODE_THREADS <= 0
    raw_qs = [queue.Queue(maxsize=PREFETCH) for _ in range(n_dec)]
    ready_qs = raw_qs if inline else [queue.Queue(maxsize=PREFETCH) for _ in range(n_dec)]
    stop = threading.Event()
    cpu_pool = (ThreadPoolExecutor(CPU_DECODE_WORKERS) if CPU_DECODE_SHARE > 0 and device.startswith("cuda")
                else None)
    threads = [threading.Thread(target=_read_batches, args=(cfg, path, shard, read_skipped, raw_qs, stop), daemon=True)]
    threads += [] if inline else [threading.Thread(target=_decode_batches, daemon=True,
                                                   args=(spec, device, raw_qs[j], ready_qs[j], stop, cpu_pool))
                                  for j in range(n_dec)]
    for t in threads:
        t.start()
    waited = busy = 0.0
    n = 0
    try:
        while True:
            t0 = time.perf_counter()
            item = ready_qs[n % n_dec].get()
            n += 1
            t1 = time.perf_counter()
            waited += t1 - t0
            if isinstance(item, _Stop):
                if item.error is not None:
                    raise item.error
                break
            if inline:
                item = _decode_one(spec, device, item, None, cpu_pool)
            metas, reasons, x, ready = item
            for meta, reason in zip(metas, reasons):
                if reason is not None:
                    skip(skipped, reason, shard, meta[2], reason.replace("_", " "), cfg.strict)
                    continue
                for name, value in zip(ROW_NAMES, meta):
                    rows[name].append(value)
            if x is not None:
                if ready is not None:  # made on a decode stream, read on this one: wait for it, keep it from early reuse
                    torch.cuda.current_stream(x.device).wait_event(ready)
                    x.record_stream(torch.cuda.current_stream(x.device))
                chunks.append(_forward(encoder, x))
            busy += time.perf_counter() - t1
        if chunks:
            chunks = [torch.cat(chunks).cpu().numpy().astype(np.float32)]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
        if cpu_pool is not None:
            cpu_pool.shutdown()
    skipped.update(read_skipped)
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
    if not any(v is not None for v in rows["text"]):
        rows.pop("text")
    info = write_shard(cfg, out_dir, shard, rows, matrix, skipped, encoder.name, source=source)
    log.info("embed %s: tensor path on %s, model busy %.2fs, waited for decode %.2fs", shard, device, busy, waited)
    return {**info, "model_busy_s": round(busy, 3), "model_wait_s": round(waited, 3)}
