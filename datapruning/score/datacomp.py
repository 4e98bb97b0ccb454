"""DataComp's metadata rules as pipeline metrics: caption length and language, image size, class names.

See docs/methods.md#clip-score-and-datacomps-filtering-baselines. Each scores 1.0 where a sample passes,
0.0 where it fails and NaN where the metadata is missing (``metrics.datacomp``); ``select.filters`` with
``threshold: 1`` keeps the passing rows. The rules read the embeddings table's ``text`` and
``original_width`` / ``original_height`` columns (DataComp's metadata, or img2dataset's ``.json``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..metrics.datacomp import caption_passes, contains_names, read_names, size_passes
from .base import Metric
from ..params import setting, show


@dataclass(frozen=True)
class CaptionParams:
    min_words: int = setting(3, ge=0, le=1 << 20)  # whitespace-separated words (DataComp: more than 2)
    min_chars: int = setting(6, ge=0, le=1 << 30)  # characters (DataComp: more than 5)
    language: str | None = "en"  # py3langid's code the caption must have; null: any language

    def check(self):
        if self.language is not None and not self.language.isalpha():
            raise ConfigError(f"config key 'score.params.caption.language': a language code such as 'en', got "
                              f"{show(self.language)}")


def score_caption(block: dict, state: dict, params: CaptionParams) -> np.ndarray:
    return caption_passes(block["text"], params.min_words, params.min_chars, params.language)


@dataclass(frozen=True)
class ImageSizeParams:
    min_side: int = setting(200, ge=0, le=1 << 30)  # pixels of the smaller side (DataComp: at least 200)
    max_aspect: float = setting(3.0, ge=1.0, le=1e9)  # longer side / shorter side (DataComp: at most 3)


def score_size(block: dict, state: dict, params: ImageSizeParams) -> np.ndarray:
    return size_passes(block["original_width"], block["original_height"], params.min_side, params.max_aspect)


NAME_SETS = ("imagenet1k",)  # names_from: open_clip's 1,000 ImageNet-1k class names (shipped with open_clip)


@dataclass(frozen=True)
class TextMatchParams:
    names: tuple[str, ...] = ()  # class names (a caption naming one of them passes) ...
    names_file: str | None = None  # ... and/or a file of them, one per line (commas separate synonyms) ...
    names_from: str | None = setting(None, choices=NAME_SETS)  # ... and/or a named set: imagenet1k

    def check(self):
        if not self.names and self.names_file is None and self.names_from is None:
            raise ConfigError("text_match needs score.params.text_match.names (a list), names_file or names_from")


def class_names(params: TextMatchParams) -> list[str]:
    names = list(params.names) + (read_names(params.names_file) if params.names_file else [])
    if params.names_from == "imagenet1k":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names += list(IMAGENET_CLASSNAMES)
    return names


def prepare_match(ctx, params: TextMatchParams) -> dict:
    return {"names": np.array(class_names(params), dtype=str)}


def score_match(block: dict, state: dict, params: TextMatchParams) -> np.ndarray:
    return contains_names(block["text"], state["names"].tolist())


def summarize_match(rows, params: TextMatchParams, state: dict) -> dict:
    return {"names": int(len(state["names"]))}


CAPTION = Metric("caption", CaptionParams, score_caption, reads=frozenset({"text"}))
IMAGE_SIZE = Metric("image_size", ImageSizeParams, score_size, reads=frozenset({"original_width", "original_height"}))
TEXT_MATCH = Metric("text_match", TextMatchParams, score_match, reads=frozenset({"text"}), prepare=prepare_match,
                    summarize=summarize_match)
