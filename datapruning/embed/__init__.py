"""Embedding: the encoder registry (``ENCODERS``), input decoding, and the embed stage (``embed.stage``)."""
from __future__ import annotations

from .encoders import ENCODERS, Encoder, build_encoder, decode_input, load_object, pick_device

__all__ = ["ENCODERS", "Encoder", "build_encoder", "decode_input", "load_object", "pick_device"]
