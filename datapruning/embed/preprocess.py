"""Batched uint8 tensor preprocessing that reproduces open_clip's PIL transform (resize, centre crop, normalise).

Shortest-side antialiased bicubic resize rounded back to uint8 as PIL does (two separable passes as batched
matrix products), torchvision's crop offsets, then mean/std, on the encoder's device.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

PASS_THROUGH = ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb", "convert_to_rgb")


@dataclass(frozen=True)
class PreprocessSpec:
    """What open_clip's preprocess does, as numbers: resize (int = shortest side, (h, w) = exact),
    center crop (h, w) or None, torch interpolation mode, per-channel mean and std."""

    resize: int | tuple[int, int]
    crop: tuple[int, int] | None
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def spec_from_transform(transform) -> PreprocessSpec | None:
    """Read a torchvision ``Compose`` of Resize / CenterCrop / Normalize (plus RGB and ToTensor steps);
    None when it holds anything else (then only the PIL path reproduces it)."""
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None)
    if steps is None:
        return None
    resize = crop = mean = std = None
    interpolation = "bilinear"
    for step in steps:
        name = getattr(step, "__name__", type(step).__name__)
        if isinstance(step, T.Resize) and resize is None and step.max_size is None:
            size = step.size
            resize = size if isinstance(size, int) else (size[0] if len(size) == 1 else (int(size[0]), int(size[1])))
            interpolation = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(step.interpolation.value)
            if interpolation is None:
                return None
        elif isinstance(step, T.CenterCrop) and crop is None:
            crop = (int(step.size[0]), int(step.size[1]))
        elif isinstance(step, T.Normalize):
            mean, std = tuple(float(v) for v in step.mean), tuple(float(v) for v in step.std)
        elif name not in PASS_THROUGH:
            return None
    if resize is None or mean is None or len(mean) != 3:
        return None
    return PreprocessSpec(resize, crop, interpolation, mean, std)


def resized_size(h: int, w: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """torchvision's output size: an int sets the shorter side, the longer scales and truncates."""
    if not isinstance(size, int):
        return size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def crop_box(h: int, w: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, pad_h, pad_w) as torchvision's center_crop: zero padding first when the image is smaller."""
    ch, cw = crop
    pad_h, pad_w = max(0, ch - h), max(0, cw - w)
    h, w = h + pad_h, w + pad_w
    return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0)), pad_h, pad_w


def resize_matrix(n_in: int, n_out: int, start: int, take: int, interpolation: str, device: str):
    """float32 [take, n_in]: output pixels ``start .. start+take`` of an antialiased 1-D resize from
    ``n_in`` to ``n_out`` as a matrix (torch's own weights: the resize applied to the identity)."""
    import torch
    import torch.nn.functional as F

    key = (n_in, n_out, start, take, interpolation, str(device))
    cached = _MATRICES.pop(key, None)
    if cached is None:
        eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, 1, n_in)
        w = F.interpolate(eye, size=(1, n_out), mode=interpolation, align_corners=False, antialias=True)
        cached = w.view(n_in, n_out)[:, start:start + take].T.contiguous().to(device, torch.float32)
    _MATRICES[key] = cached  # most recent last
    if len(_MATRICES) > MATRIX_CACHE:  # least recently used out: a few hundred MiB at most
        _MATRICES.popitem(last=False)
    return cached


_MATRICES: OrderedDict = OrderedDict()
MATRIX_CACHE = 1024  # resize matrices kept (one per input side length, output size and crop)


def _resize_crop(batch, spec: PreprocessSpec):
    """uint8 [B, 3, h, w] of one size -> float [B, 3, crop] with values 0..255, or None when a pad is needed.
    Two batched GEMMs (width, then height, only the cropped outputs), each rounded to uint8 values as PIL's
    two passes are (PIL resizes horizontally into an 8-bit image, then vertically)."""
    h, w = batch.shape[-2:]
    size = resized_size(h, w, spec.resize)
    crop = spec.crop or size
    top, left, pad_h, pad_w = crop_box(size[0], size[1], crop)
    if pad_h or pad_w:
        return None
    x = batch.float()
    if size[1] != w:
        x = (x @ resize_matrix(w, size[1], left, crop[1], spec.interpolation, x.device).T).round_().clamp_(0, 255)
    else:
        x = x[..., left:left + crop[1]]
    if size[0] != h:
        x = (resize_matrix(h, size[0], top, crop[0], spec.interpolation, x.device) @ x).round_().clamp_(0, 255)
    else:
        x = x[..., top:top + crop[0], :]
    return x


def preprocess_images(images: list, spec: PreprocessSpec):
    """uint8 [3, H, W] tensors (any mix of sizes, one device) -> float32 [B, 3, h, w] model input.
    Images of equal size are resized together."""
    import torch
    import torch.nn.functional as F

    out = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    for (h, w), rows in groups.items():
        batch = torch.stack([images[i] for i in rows]) if len(rows) > 1 else images[rows[0]][None]
        x = _resize_crop(batch, spec)
        if x is None:  # smaller than the crop: torchvision's padding path
            size = resized_size(h, w, spec.resize)
            x = batch.float()
            if size != (h, w):
                x = F.interpolate(x, size=size, mode=spec.interpolation, align_corners=False,
                                  antialias=True).round_().clamp_(0, 255)
            top, left, pad_h, pad_w = crop_box(size[0], size[1], spec.crop)
            x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
            x = x[:, :, top:top + spec.crop[0], left:left + spec.crop[1]]
        if len(groups) == 1:
            out = x
            break
        for j, i in enumerate(rows):
            out[i] = x[j]
    x = out if isinstance(out, torch.Tensor) else torch.stack(out)
    scale = torch.tensor([1 / (255.0 * v) for v in spec.std], device=x.device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / v for m, v in zip(spec.mean, spec.std)], device=x.device).view(1, 3, 1, 1)
    return torch.addcmul(shift, x, scale)
