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


def _count(key: str, value, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class CaptionParams:
    min_words: int = 3  # whitespace-separated words (DataComp: more than 2)
    min_chars: int = 6  # characters (DataComp: more than 5)
    language: str | None = "en"  # py3langid's code the caption must have; null: any language

    def check(self):
        _count("score.params.caption.min_words", self.min_words)
        _count("score.params.caption.min_chars", self.min_chars)
        if self.language is not None and not (isinstance(self.language, str) and self.language.isalpha()):
            raise ConfigError(f"score.params.caption.language: a language code such as 'en', got {self.language!r}")


def score_caption(block: dict, state: dict, params: CaptionParams) -> np.ndarray:
    return caption_passes(block["text"], params.min_words, params.min_chars, params.language)


@dataclass(frozen=True)
class ImageSizeParams:
    min_side: int = 200  # pixels of the smaller side (DataComp: at least 200)
    max_aspect: float = 3.0  # longer side / shorter side (DataComp: at most 3)

    def check(self):
        _count("score.params.image_size.min_side", self.min_side)
        if isinstance(self.max_aspect, bool) or not isinstance(self.max_aspect, (int, float)) \
                or not 1.0 <= self.max_aspect < float("inf"):
            raise ConfigError(f"score.params.image_size.max_aspect: a number >= 1, got {self.max_aspect!r}")


def score_size(block: dict, state: dict, params: ImageSizeParams) -> np.ndarray:
    return size_passes(block["original_width"], block["original_height"], params.min_side, params.max_aspect)


NAME_SETS = ("imagenet1k",)  # names_from: open_clip's 1,000 ImageNet-1k class names (shipped with open_clip)


@dataclass(frozen=True)
class TextMatchParams:
    names: tuple = ()  # class names (a caption naming one of them passes) ...
    names_file: str | None = None  # ... and/or a file of them, one per line (commas separate synonyms) ...
    names_from: str | None = None  # ... and/or a named set: imagenet1k

    def check(self):
        if not isinstance(self.names, (list, tuple)) or not all(isinstance(n, str) for n in self.names):
            raise ConfigError(f"score.params.text_match.names: a list of class names, got {self.names!r}")
        if self.names_file is not None and not isinstance(self.names_file, str):
            raise ConfigError(f"score.params.text_match.names_file: a path, got {self.names_file!r}")
        if self.names_from is not None and self.names_from not in NAME_SETS:
            raise ConfigError(f"score.params.text_match.names_from: one of {list(NAME_SETS)}, got {self.names_from!r}")
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
