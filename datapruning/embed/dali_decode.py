"""The DALI decode step (``embed.image_decode: dali``): images decoded and preprocessed by NVIDIA DALI.

``fn.decoders.image`` (``device="mixed"``: the hardware JPEG decoder and nvjpeg on CUDA; DALI's CPU backend
without a GPU, with libjpeg-style fancy chroma upsampling either way), then ``fn.resize`` to torchvision's
exact output size, ``fn.slice`` at torchvision's centre-crop offsets (zero padding where the image is
smaller) and ``fn.crop_mirror_normalize``; the batch reaches torch through DLPack. The tar is read by the
chain's own reader, so every sample keeps its uid and skip reason as on the PIL path. A batch DALI cannot
decode whole (a corrupt image) is decoded by the tensor step instead, which names the bad samples.
"""
from __future__ import annotations

import atexit
import io
import logging
import queue
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .gpu_decode import TensorDecoder, thread_stream
from .pipeline import Decoded
from .preprocess import PreprocessSpec, crop_box, resized_size
from .samples import image_bytes, pair_reasons
from ..errors import EncoderError

log = logging.getLogger(__name__)

DALI_THREADS = 4  # DALI's own CPU threads per pipeline (one pipeline per decode thread)


def import_dali():
    try:
        from nvidia import dali
        from nvidia.dali import fn, types
    except ImportError as exc:
        raise EncoderError("embed.image_decode=dali needs NVIDIA DALI: pip install 'datapruning[gpu]' "
                           "(nvidia-dali-cuda130), or set embed.image_decode=auto") from exc
    return dali, fn, types


def geometry(data: bytes, spec: PreprocessSpec) -> tuple[list, list] | None:
    """torchvision's resize size (h, w) and crop start (top, left; negative where it pads) for one image, read
    from its header; None when the header cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        return None
    size = resized_size(h, w, spec.resize)
    crop = spec.crop or size
    top, left, pad_h, pad_w = crop_box(size[0], size[1], crop)
    return [float(size[0]), float(size[1])], [top - pad_h // 2, left - pad_w // 2]


def build_pipeline(spec: PreprocessSpec, device: str, batch_size: int, threads: int = DALI_THREADS):
    """A DALI pipeline fed by ``feed_input``: "data" (encoded images), "size" and "start" (``geometry``)."""
    dali, fn, types = import_dali()
    gpu = device.startswith("cuda")
    device_id = (int(device.split(":")[1]) if ":" in device else 0) if gpu else None

    @dali.pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=1)
    def pipe():
        data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
        size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
        start = fn.external_source(name="start", dtype=types.INT32, ndim=1)
        img = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                adjust_orientation=False, jpeg_fancy_upsampling=True)
        img = fn.resize(img, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
        crop = spec.crop or None
        if crop is not None:
            img = fn.slice(img, start=start, shape=list(crop), axes=[0, 1], out_of_bounds_policy="pad",
                           fill_values=0)
        return fn.crop_mirror_normalize(img, mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
                                        dtype=types.FLOAT, output_layout="CHW")

    p = pipe()
    p.build()
    return p


def to_torch(out, device: str):
    """A DALI batch of equal-shape samples as one torch tensor on ``device`` (through DLPack on CUDA), copied
    out of DALI's buffers, which its next run reuses; returns (tensor, CUDA event it is ready at, or None)."""
    import torch

    tensor = out.as_tensor()
    if not device.startswith("cuda"):
        return torch.from_numpy(np.array(tensor)), None
    stream = thread_stream(device)
    with torch.cuda.stream(stream):
        x = torch.from_dlpack(tensor).clone()
        ready = torch.cuda.Event()
        ready.record(stream)
    return x, ready


@dataclass
class DaliDecoder:
    """The decode step on DALI: built pipelines are kept for reuse (one per decode thread at a time), across
    shards when the decoder is (``stage.get_decoder``)."""

    spec: PreprocessSpec
    device: str
    modality: str
    icfg: Any
    name: str = "dali"
    fast: bool = True  # io.tarstream reads the tar: one Python thread must keep up with the GPU
    _free: Any = field(default_factory=queue.SimpleQueue, repr=False)

    def __post_init__(self):
        import_dali()
        self._fallback = TensorDecoder(self.spec, self.device, self.modality, self.icfg)
        atexit.register(self.close)  # DALI's pipelines must go before the interpreter tears its modules down

    def close(self) -> None:
        """Drop the kept pipelines."""
        while True:
            try:
                self._free.get_nowait()
            except queue.Empty:
                return

    def pipeline(self, batch_size: int) -> tuple:
        """(max batch size, pipeline): a free one large enough, else a new one."""
        try:
            have = self._free.get_nowait()
        except queue.Empty:
            have = None
        if have is None or have[0] < batch_size:
            have = (batch_size, build_pipeline(self.spec, self.device, batch_size))
        return have

    def __call__(self, batch: list) -> Decoded:
        if self.modality == "pair":
            texts, reasons = pair_reasons(batch, self.icfg)
        else:
            texts, reasons = [None] * len(batch), [None] * len(batch)
        raw = [image_bytes(sample, self.icfg) for _, sample in batch]
        geo = [geometry(d, self.spec) if isinstance(d, bytes) else None for d in raw]
        reasons = [d if isinstance(d, str) else ("corrupt_image" if g is None else r)
                   for d, g, r in zip(raw, geo, reasons)]
        rows = [i for i, r in enumerate(reasons) if r is None]
        if not rows:
            return Decoded([m for m, _ in batch], reasons)
        size, pipe = self.pipeline(len(batch))
        try:
            pipe.feed_input("data", [np.frombuffer(raw[i], np.uint8) for i in rows])
            pipe.feed_input("size", [np.array(geo[i][0], np.float32) for i in rows])
            pipe.feed_input("start", [np.array(geo[i][1], np.int32) for i in rows])
            (out,) = pipe.run()
            x, ready = to_torch(out, self.device)
        except Exception as exc:  # noqa: BLE001 - DALI reports a bad image as a generic error for the batch
            log.info("DALI could not decode a batch (%s); decoding it with the tensor step",
                     str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return self._fallback(batch)  # a failed run leaves the pipeline unusable: it is not kept
        self._free.put((size, pipe))
        pair_texts = [texts[i] for i in rows] if self.modality == "pair" else None
        return Decoded([m for m, _ in batch], reasons, x, pair_texts, ready)
