"""SimCLR's augmentations (Chen et al., 2020), every size and strength a parameter."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torchvision.transforms import v2

from .images import decode_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PROBABILITIES = (
    "horizontal_flip_probability",
    "color_jitter_probability",
    "grayscale_probability",
    "blur_probability",
)
_CACHED = ("train_pipeline", "eval_pipeline")

# EMC² paper, STL-10 at 96 px (SimCLR's recipe with s = 1; the reference code blurs every view).
_STL10_PRESET: dict[str, Any] = {
    "image_size": 96,
    "crop_scale": (0.08, 1.0),
    "horizontal_flip_probability": 0.5,
    "brightness": 0.8,
    "contrast": 0.8,
    "saturation": 0.8,
    "hue": 0.2,
    "color_jitter_probability": 0.8,
    "grayscale_probability": 0.2,
    "blur_probability": 1.0,
    "blur_sigma": (0.1, 2.0),
}
AUGMENTATION_PRESETS: dict[str, dict[str, Any]] = {
    "stl10": _STL10_PRESET,
    # EMC² paper, ImageNet-100 at 224 px: the same pipeline with MoCo v2's weaker jitter.
    "imagenet100": {
        **_STL10_PRESET,
        "image_size": 224,
        "brightness": 0.4,
        "contrast": 0.4,
        "saturation": 0.2,
        "hue": 0.1,
    },
    # scikit-learn's 8×8 digits upscaled to 32 px: milder crops, no flips (a flipped 2 is not a 2), no blur.
    "digits": {
        "image_size": 32,
        "crop_scale": (0.5, 1.0),
        "horizontal_flip_probability": 0.0,
        "blur_probability": 0.0,
    },
}


def _invalid(name: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"SimCLRAugmentation: {name}={value!r} is invalid; it must be {valid}.")


class NormalisedImagePipelines:
    """What an image-transform dataclass shares: ``train_pipeline`` / ``eval_pipeline`` (cached properties the
    subclass defines) applied to a decoded image, ending in a float tensor normalised by ``mean`` and ``std``; the
    cached pipelines are rebuilt when a field changes and are not pickled (DataLoader workers rebuild them)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def train_transform(self, image: Any) -> torch.Tensor:
        """A random training view of ``image`` (a PIL image, or anything :func:`decode_image` accepts).

        Returns:
            ``FloatTensor[3, image_size, image_size]``, normalised by ``mean`` and ``std``.
        """
        return self.train_pipeline(decode_image(image))

    def eval_transform(self, image: Any) -> torch.Tensor:
        """The deterministic view of ``image`` (resize, centre crop, normalise).

        Returns:
            ``FloatTensor[3, image_size, image_size]``.
        """
        return self.eval_pipeline(decode_image(image))

    def _to_normalised_tensor(self) -> list[v2.Transform]:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self.__dataclass_fields__:
            for cached in _CACHED:
                self.__dict__.pop(cached, None)

    def __getstate__(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if name not in _CACHED}


@dataclass
class SimCLRAugmentation(NormalisedImagePipelines):
    """Random resized crop → horizontal flip → colour jitter (p) → grayscale (p) → Gaussian blur (p) → normalise.

    The composed torchvision pipelines are built on first use and cached; assigning a field drops the cache, and
    pickling (e.g. into DataLoader workers) sends only the fields.

    Args:
        image_size: side of the square output, in pixels (> 0).
        crop_scale: ``(low, high)`` area of the random crop as a fraction of the image, ``0 < low ≤ high ≤ 1``.
        horizontal_flip_probability: probability of a horizontal flip, in [0, 1].
        brightness: ``ColorJitter`` brightness strength (≥ 0; SimCLR: 0.8·s).
        contrast: ``ColorJitter`` contrast strength (≥ 0; SimCLR: 0.8·s).
        saturation: ``ColorJitter`` saturation strength (≥ 0; SimCLR: 0.8·s).
        hue: ``ColorJitter`` hue strength, in [0, 0.5] (SimCLR: 0.2·s).
        color_jitter_probability: probability the colour jitter is applied, in [0, 1].
        grayscale_probability: probability of converting to grayscale, in [0, 1].
        blur_probability: probability of a Gaussian blur, in [0, 1]; kernel ≈ 10% of ``image_size`` (odd, ≥ 3).
        blur_sigma: ``(low, high)`` range of the blur's σ, ``0 < low ≤ high``.
        mean: per-channel normalisation mean (3 values; ImageNet's by default).
        std: per-channel normalisation standard deviation (3 positive values; ImageNet's by default).
    """

    image_size: int = 96
    crop_scale: tuple[float, float] = (0.08, 1.0)
    horizontal_flip_probability: float = 0.5
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    color_jitter_probability: float = 0.8
    grayscale_probability: float = 0.2
    blur_probability: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        self.blur_sigma = tuple(float(v) for v in self.blur_sigma)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.validate()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SimCLRAugmentation:
        """The augmentations of a named experiment (:data:`AUGMENTATION_PRESETS`: ``"stl10"``, ``"imagenet100"``,
        ``"digits"``), with any field overridden by keyword."""
        if name not in AUGMENTATION_PRESETS:
            raise ValueError(f"unknown augmentation preset {name!r}; choose one of {sorted(AUGMENTATION_PRESETS)}")
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"SimCLRAugmentation has no field(s) {unknown}; fields: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**{**AUGMENTATION_PRESETS[name], **overrides})

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first field outside its valid range."""
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise _invalid("image_size", self.image_size, "a positive integer number of pixels")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise _invalid("crop_scale", self.crop_scale, "(low, high) with 0 < low <= high <= 1")
        for name in _PROBABILITIES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise _invalid(name, getattr(self, name), "a probability in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if not getattr(self, name) >= 0.0:
                raise _invalid(name, getattr(self, name), ">= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise _invalid("hue", self.hue, "in [0, 0.5]")
        if len(self.blur_sigma) != 2 or not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise _invalid("blur_sigma", self.blur_sigma, "(low, high) with 0 < low <= high")
        if len(self.mean) != 3:
            raise _invalid("mean", self.mean, "3 values, one per RGB channel")
        if len(self.std) != 3 or not all(s > 0.0 for s in self.std):
            raise _invalid("std", self.std, "3 positive values, one per RGB channel")

    @property
    def blur_kernel_size(self) -> int:
        """Gaussian blur kernel side: 10% of ``image_size``, rounded down to an integer, made odd, at least 3."""
        size = max(3, int(0.1 * self.image_size))
        return size if size % 2 == 1 else size + 1

    @cached_property
    def train_pipeline(self) -> v2.Compose:
        """The random torchvision pipeline behind :meth:`train_transform`."""
        self.validate()
        jitter = v2.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue)
        blur = v2.GaussianBlur(self.blur_kernel_size, sigma=self.blur_sigma)
        return v2.Compose(
            [
                v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, antialias=True),
                v2.RandomHorizontalFlip(self.horizontal_flip_probability),
                v2.RandomApply([jitter], p=self.color_jitter_probability),
                v2.RandomGrayscale(self.grayscale_probability),
                v2.RandomApply([blur], p=self.blur_probability),
                *self._to_normalised_tensor(),
            ]
        )

    @cached_property
    def eval_pipeline(self) -> v2.Compose:
        """The deterministic torchvision pipeline behind :meth:`eval_transform`."""
        self.validate()
        return v2.Compose(
            [v2.Resize(self.image_size, antialias=True), v2.CenterCrop(self.image_size), *self._to_normalised_tensor()]
        )
