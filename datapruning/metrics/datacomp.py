"""DataComp's per-sample rules on arrays: CLIP score, caption length and language, image size, class names.

See docs/methods.md#clip-score-and-datacomps-filtering-baselines. Each returns float64 scores: the CLIP
score itself, or 1.0 for a sample that passes a rule, 0.0 for one that fails and NaN where the metadata
the rule reads is missing. The select stage's filters (``select.filters``) keep the passing rows.
"""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np

from ..errors import ConfigError

WORD = re.compile(r"\w+")


def clip_scores(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """The CLIP score of each pair: the cosine of its L2-normalised image and caption embeddings (float32)."""
    image, text = np.asarray(image, np.float32), np.asarray(text, np.float32)
    if image.size == 0:
        return np.zeros(len(image), np.float32)
    return np.einsum("ij,ij->i", image, text)


def languages(texts: Iterable[str | None]) -> list[str | None]:
    """The language code of each text by py3langid (its model ships inside the package; nothing is downloaded),
    line breaks read as spaces, as DataComp does before fasttext; None for a missing text."""
    try:
        import py3langid
    except ImportError as exc:
        raise ConfigError("a caption language rule needs py3langid: pip install 'datapruning[lang]' "
                          "(or set the rule's language: null)") from exc
    return [None if t is None else py3langid.classify(t.replace("\n", " "))[0] for t in texts]


def caption_passes(texts, min_words: int = 3, min_chars: int = 6, language: str | None = "en") -> np.ndarray:
    """1.0 where a caption has at least ``min_words`` whitespace-separated words and ``min_chars`` characters
    (and, with ``language``, is identified as that language), else 0.0; NaN without a caption. DataComp's basic
    filter is words > 2, characters > 5, English (``min_words=3, min_chars=6, language='en'``)."""
    texts = list(texts)
    ok = np.array([t is not None and len(t.split()) >= min_words and len(t) >= min_chars for t in texts], bool)
    if language is not None and ok.any():
        rows = np.flatnonzero(ok)
        ok[rows] = np.array(languages([texts[i] for i in rows])) == language
    out = ok.astype(np.float64)
    out[[t is None for t in texts]] = np.nan
    return out


def size_passes(width, height, min_side: int = 200, max_aspect: float = 3.0) -> np.ndarray:
    """1.0 where an image's smaller side is at least ``min_side`` pixels and its longer side at most
    ``max_aspect`` times the shorter, else 0.0; NaN where the size is unknown (DataComp's ``original_width`` /
    ``original_height``: smaller side >= 200, aspect ratio <= 3)."""
    w, h = np.asarray(width, np.float64), np.asarray(height, np.float64)
    short, long = np.minimum(w, h), np.maximum(w, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = ((short >= min_side) & (long / short <= max_aspect)).astype(np.float64)
    out[np.isnan(w) | np.isnan(h)] = np.nan
    return out


def words(text: str) -> tuple[str, ...]:
    return tuple(WORD.findall(text.lower()))


def contains_names(texts, names: Iterable[str]) -> np.ndarray:
    """1.0 where a caption contains one of ``names`` as whole words (case-insensitive; a multi-word name as
    consecutive words, so 'golden retriever' matches 'A Golden Retriever puppy' but 'cat' not 'category'),
    else 0.0; NaN without a caption."""
    wanted: dict[int, set] = {}
    for name in names:
        w = words(name)
        if w:
            wanted.setdefault(len(w), set()).add(w)
    out = np.zeros(len(texts), np.float64)
    for i, text in enumerate(texts):
        if text is None:
            out[i] = np.nan
            continue
        w = words(text)
        out[i] = any(tuple(w[s:s + n]) in grams for n, grams in wanted.items() for s in range(len(w) - n + 1))
    return out


def read_names(path: str) -> list[str]:
    """Class names from a text file, one per line; blank lines and '#' comments skipped. A line may list
    synonyms separated by commas (ImageNet's class-name files do)."""
    from pathlib import Path

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"class names file {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    names = [n.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
             for n in line.split(",")]
    if not any(names):
        raise ConfigError(f"class names file {path}: no names in it")
    return [n for n in names if n]
