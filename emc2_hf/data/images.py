"""Decode whatever an image column holds into an RGB PIL image, with errors that name the row and the file."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError)
SKIP_HINT = "or pass --skip_undecodable_images true (recipes) to drop such rows"


class UndecodableImageError(ValueError):
    """An image that is missing or cannot be decoded; the message names the row, its dataset and its file."""


def image_file(value: Any) -> str | None:
    """The file an image value came from, when it says (a ``{"bytes", "path"}`` dict or a path), else None."""
    if isinstance(value, dict):
        path = value.get("path")
        return str(path) if path else None
    if isinstance(value, str | os.PathLike):
        return str(value)
    return None


def describe_image(value: Any, row: int | None = None, source: str | None = None) -> str:
    """``"row 3 of the probe evaluation set (file /data/x.jpg)"``: where an image is, for error messages."""
    where = f"row {row} of {source or 'the dataset'}" if row is not None else (source or "the input")
    path = image_file(value)
    return f"{where} (file {path})" if path else where


def decode_image(value: Any, row: int | None = None, source: str | None = None) -> Image.Image:
    """Return ``value`` as an RGB ``PIL.Image.Image``.

    Accepts:

    * a PIL image;
    * a numpy array ``[H, W]`` or ``[H, W, C]`` (C in 1…4), or a torch tensor ``[H, W]``, ``[H, W, C]`` or
      ``[C, H, W]``. ``uint8`` is taken as is; floats are scaled by 255 when their maximum is ≤ 1 (else taken as
      0…255); other integers are taken as 16-bit (÷ 257) when any value exceeds 255; booleans map to 0/255;
    * a dict as ``datasets`` stores undecoded images, ``{"bytes": b"..." | None, "path": "..." | None}``;
    * encoded bytes (PNG, JPEG, …) or a file path.

    Images read from bytes or a path are rotated by their EXIF orientation, as ``datasets.Image`` does. 16-bit and
    float images (modes ``"I"``, ``"I;16"``, ``"F"``) are rescaled by the array rules above; grayscale, bilevel,
    palette, CMYK and other modes are converted with ``Image.convert("RGB")``; images with transparency (``RGBA``,
    ``LA``, ``PA``, palette with a transparent colour) are composited on white, so transparent pixels become white.

    Args:
        value: the image, in any of the forms above.
        row: its dataset index, for the error message.
        source: the dataset or split it belongs to, for the error message (e.g. ``"split 'test' of 'jxie/stl10'"``).

    Raises:
        UndecodableImageError: (a ``ValueError``) naming ``row``, ``source`` and the file (when ``value`` names one)
            if ``value`` is ``None`` or cannot be decoded.
    """
    where = describe_image(value, row, source)
    if value is None:
        raise UndecodableImageError(
            f"The image in {where} is missing (None). Fill it in or remove that row, e.g. "
            f"dataset.filter(lambda row: row['image'] is not None), {SKIP_HINT}."
        )
    try:
        return _to_rgb(_to_pil(value))
    except _DECODE_ERRORS as error:
        raise UndecodableImageError(
            f"Could not decode the image in {where} ({type(error).__name__}: {error}). Fix or remove that row, "
            f"{SKIP_HINT}."
        ) from error


def _to_pil(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return _open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return _open(value["path"])
        raise ValueError(f"the image dict has neither 'bytes' nor 'path' (keys: {sorted(value)})")
    if isinstance(value, bytes | bytearray | memoryview):
        return _open(io.BytesIO(value))
    if isinstance(value, str | os.PathLike):
        return _open(value)
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # [C, H, W] → [H, W, C]
        return _from_array(array)
    if isinstance(value, np.ndarray):
        return _from_array(value)
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def _open(source: Any) -> Image.Image:
    image = Image.open(source)
    image.load()  # decode now, so a corrupt file fails here
    return ImageOps.exif_transpose(image)


def _from_array(array: np.ndarray) -> Image.Image:
    """``[H, W]`` or ``[H, W, C]`` array of any numeric dtype → uint8 PIL image (``L``, ``LA``, ``RGB``, ``RGBA``)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)) or array.size == 0:
        raise ValueError(f"an image array must be [H, W] or [H, W, C] with C in 1…4, got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        floating = np.issubdtype(array.dtype, np.floating)
        array = np.nan_to_num(np.asarray(array, dtype=np.float64))
        if floating and array.max() <= 1.0:
            array = array * 255.0
        elif not floating and array.max() > 255:
            array = array / 257.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        image = _from_array(np.asarray(image))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def find_undecodable_images(
    dataset: Any, image_column: str = "image", source: str | None = None, batch_size: int = 256
) -> list[tuple[int, str]]:
    """Decode every image of ``dataset`` once; return ``(row, description)`` of each that fails.

    ``dataset`` is a ``datasets.Dataset`` (an ``Image`` column is read undecoded, so a corrupt file is caught here and
    not inside ``datasets``) or a sequence of dict rows. Rows come in order; a description reads e.g.
    ``"row 7 of split 'train' (file /data/train/cat/7.jpg)"``.
    """
    import datasets

    if isinstance(dataset, datasets.Dataset):
        feature = dataset.features.get(image_column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    failures = []
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        if isinstance(dataset, datasets.Dataset):
            values = dataset[start:stop][image_column]
        else:
            values = [dataset[row][image_column] for row in range(start, stop)]
        for row, value in enumerate(values, start=start):
            try:
                if value is None:
                    raise ValueError("missing")
                _to_rgb(_to_pil(value))
            except _DECODE_ERRORS:
                failures.append((row, describe_image(value, row, source)))
    return failures
