"""The decode steps of the embed chain (``embed.image_decode``): PIL on CPU threads, tensors (nvjpeg), or DALI.

Each is a callable from a batch of ``(row values, sample)`` to a ``pipeline.Decoded``; ``choose_decoder``
picks one. ``auto`` takes DALI where it is installed and the encoder runs on CUDA, else the tensor path on
CUDA, else PIL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .encoders import decode_input
from .pipeline import Decoded
from .samples import sample_caption


@dataclass
class PilDecoder:
    """PIL (images) or UTF-8 (texts) per sample, then the encoder's own ``prepare``; pairs add the caption."""

    prepare: Callable[[Any], Any]
    modality: str
    icfg: Any
    name: str = "pil"
    fast: bool = False  # tarfile reads the tar (the fast parser is for the GPU paths)

    def __call__(self, batch: list) -> Decoded:
        kind = "image" if self.modality == "pair" else self.modality
        reasons, inputs, texts = [], [], []
        for _, sample in batch:
            try:
                item = self.prepare(decode_input(sample, kind, self.icfg.image_keys, self.icfg.text_keys))
                text = sample_caption(sample, self.icfg) if self.modality == "pair" else None
            except ValueError as exc:
                reasons.append(str(exc))
                continue
            reasons.append(None)
            inputs.append(item)
            texts.append(text)
        return Decoded([m for m, _ in batch], reasons, inputs or None,
                       texts if self.modality == "pair" and inputs else None)


def choose_decoder(cfg, encoder):
    """The decode step for ``embed.image_decode`` on this encoder (see the module docstring)."""
    from .gpu_decode import TensorDecoder, tensor_decode_spec

    spec = tensor_decode_spec(cfg, encoder)
    mode = cfg.embed.image_decode
    cuda = str(encoder.device).startswith("cuda")
    if spec is not None and (mode == "dali" or (mode == "auto" and cuda and dali_available())):
        from .dali_decode import DaliDecoder

        return DaliDecoder(spec, str(encoder.device), cfg.embed.modality, cfg.input)
    if spec is not None and (mode == "tensor" or (mode == "auto" and cuda)):
        return TensorDecoder(spec, str(encoder.device), cfg.embed.modality, cfg.input)
    return PilDecoder(encoder.prepare, cfg.embed.modality, cfg.input,
                      "text" if cfg.embed.modality == "text" else "pil")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True
