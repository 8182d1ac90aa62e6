"""Decode whatever an image column holds into an RGB PIL image, with errors that name the row."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def decode_image(value: Any, row: int | None = None) -> Image.Image:
    """Return ``value`` as an RGB ``PIL.Image``.

    Accepts a PIL image, a numpy array or torch tensor (``H×W``, ``H×W×C`` or ``C×H×W``; uint8, or float in [0, 1]),
    a dict as ``datasets`` stores undecoded images (``{"bytes": ..., "path": ...}``), raw bytes, or a file path.
    Grayscale, palette, CMYK and RGBA images are converted to RGB (alpha is dropped). An undecodable value raises a
    ``ValueError`` naming ``row``.
    """
    where = f"row {row}" if row is not None else "an image"
    if value is None:
        raise ValueError(f"the image in {where} of the dataset is missing (None); remove that row or fill it in")
    try:
        image = _to_pil(value)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError) as error:
        raise ValueError(
            f"could not decode the image in {where} of the dataset ({type(error).__name__}: {error}); fix or remove "
            "that row, e.g. with dataset.filter(...)"
        ) from error
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_pil(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
        raise ValueError("the image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
        if value.ndim == 3 and value.shape[0] in (1, 3, 4) and value.shape[-1] not in (1, 3, 4):
            value = value.transpose(1, 2, 0)
    if isinstance(value, np.ndarray):
        array = value
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8:
            array = np.asarray(array, dtype=np.float64)
            if array.max(initial=0.0) <= 1.0:
                array = array * 255.0
            array = np.clip(array, 0, 255).astype(np.uint8)
        if array.ndim not in (2, 3):
            raise ValueError(f"an image array must be H×W or H×W×C, got shape {array.shape}")
        return Image.fromarray(array)
    raise TypeError(f"unsupported image value of type {type(value).__name__}")
