"""The tensor decode step for open_clip image encoders: batched JPEG decode, resize, crop, normalise as tensors.

Decoding is nvjpeg on CUDA (libjpeg on CPU), each decode thread on its own CUDA stream, so the model does not
wait; the preprocessing math is ``embed.preprocess``. Chosen by ``embed.image_decode`` (see ``decoders``).
"""
from __future__ import annotations

import logging
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .pipeline import Decoded
from .preprocess import PreprocessSpec, preprocess_images, spec_from_transform
from .samples import image_bytes, pair_reasons
from ..errors import BadSample

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"


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


def tensor_decode_spec(cfg, encoder) -> PreprocessSpec | None:
    """The preprocess spec the tensor and DALI decode steps reproduce; None where only PIL can (text, a
    preprocess other than Resize/CenterCrop/Normalize, ``pil``, or ``auto`` off CUDA)."""
    mode = cfg.embed.image_decode
    if mode == "pil" or cfg.embed.modality == "text":
        return None
    is_clip_image = cfg.embed.encoder == "open_clip" and cfg.embed.modality in ("image", "pair")
    spec = spec_from_transform(encoder.prepare) if is_clip_image else None
    if mode in ("tensor", "dali") and spec is None:
        from ..errors import EncoderError

        raise EncoderError(f"embed.image_decode={mode} needs an open_clip image encoder whose preprocess is "
                           "Resize/CenterCrop/Normalize; set embed.image_decode=auto or pil")
    if mode == "auto" and not str(encoder.device).startswith("cuda"):
        return None
    return spec


_STREAMS = threading.local()  # each decode thread's own CUDA stream


def thread_stream(device: str):
    """This thread's CUDA stream on ``device`` (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    import torch

    stream = getattr(_STREAMS, "stream", None)
    if stream is None:
        stream = _STREAMS.stream = torch.cuda.Stream(device)
    return stream


@dataclass
class TensorDecoder:
    """Batched decode (nvjpeg on CUDA, libjpeg on CPU, PIL for the rest) and the open_clip preprocess as tensor
    ops, queued on the calling thread's CUDA stream. ``cpu_share``: the share of each batch's JPEGs decoded by
    libjpeg on ``cpu_workers`` CPU threads beside nvjpeg (CUDA only)."""

    spec: PreprocessSpec
    device: str
    modality: str
    icfg: Any
    cpu_share: float = 0.0
    cpu_workers: int = 8
    name: str = "tensor"
    fast: bool = True  # io.tarstream reads the tar: one Python thread must keep up with the GPU
    _pool: Any = field(default=None, repr=False)

    def __post_init__(self):
        if self.cpu_share > 0 and self.device.startswith("cuda"):
            self._pool = ThreadPoolExecutor(self.cpu_workers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def __call__(self, batch: list) -> Decoded:
        import torch

        if self.modality == "pair":
            texts, reasons = pair_reasons(batch, self.icfg)
        else:
            texts, reasons = [None] * len(batch), [None] * len(batch)
        stream = thread_stream(self.device)
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            raw = [image_bytes(sample, self.icfg) for _, sample in batch]
            datas = [d for d in raw if isinstance(d, bytes)]
            decoded = iter(decode_images(datas, self.device, self._pool, self.cpu_share))
            items = [next(decoded) if isinstance(d, bytes) else d for d in raw]
            reasons = [t if isinstance(t, str) else r for t, r in zip(items, reasons)]  # the image's reason first
            good = [t for t, r in zip(items, reasons) if r is None]
            x = preprocess_images(good, self.spec) if good else None
            ready = torch.cuda.Event() if stream is not None else None
            if ready is not None:
                ready.record(stream)
        pair_texts = [t for t, r in zip(texts, reasons) if r is None] if self.modality == "pair" and good else None
        return Decoded([m for m, _ in batch], reasons, x, pair_texts, ready)
