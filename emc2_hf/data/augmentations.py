"""SimCLR's augmentations (Chen et al., 2020), every size and strength a parameter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


@dataclass
class SimCLRAugmentation:
    """Random resized crop → horizontal flip → colour jitter (p) → grayscale (p) → Gaussian blur (p) → normalise.

    Args:
        image_size: side of the square output, in pixels.
        crop_scale: range of the crop's area as a fraction of the image, ``0 < low ≤ high ≤ 1``.
        horizontal_flip_probability: probability of a horizontal flip.
        brightness, contrast, saturation, hue: ``ColorJitter`` strengths (SimCLR: 0.8s, 0.8s, 0.8s, 0.2s).
        color_jitter_probability: probability the jitter is applied.
        grayscale_probability: probability of converting to grayscale.
        blur_probability: probability of a Gaussian blur; kernel ≈ 10% of ``image_size`` (odd, ≥ 3).
        blur_sigma: range of the blur's σ.
        mean, std: per-channel normalisation.
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
        if self.image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {self.image_size}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        for name in (
            "horizontal_flip_probability",
            "color_jitter_probability",
            "grayscale_probability",
            "blur_probability",
        ):
            _check_probability(name, getattr(self, name))
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        self.crop_scale = (float(low), float(high))
        self.blur_sigma = (float(self.blur_sigma[0]), float(self.blur_sigma[1]))
        self._train: v2.Compose | None = None
        self._eval: v2.Compose | None = None

    @property
    def blur_kernel_size(self) -> int:
        size = max(3, int(0.1 * self.image_size))
        return size if size % 2 == 1 else size + 1

    def _finish(self) -> list:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def train_transform(self, image: Image.Image) -> torch.Tensor:
        """A random view of ``image``: ``FloatTensor[3, image_size, image_size]``."""
        if self._train is None:
            jitter = v2.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue)
            blur = v2.GaussianBlur(self.blur_kernel_size, sigma=self.blur_sigma)
            self._train = v2.Compose(
                [
                    v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, antialias=True),
                    v2.RandomHorizontalFlip(self.horizontal_flip_probability),
                    v2.RandomApply([jitter], p=self.color_jitter_probability),
                    v2.RandomGrayscale(self.grayscale_probability),
                    v2.RandomApply([blur], p=self.blur_probability),
                    *self._finish(),
                ]
            )
        return self._train(image)

    def eval_transform(self, image: Image.Image) -> torch.Tensor:
        """Deterministic: resize the shorter side to ``image_size``, centre crop, normalise."""
        if self._eval is None:
            self._eval = v2.Compose(
                [
                    v2.Resize(self.image_size, antialias=True),
                    v2.CenterCrop(self.image_size),
                    *self._finish(),
                ]
            )
        return self._eval(image)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_train"] = state["_eval"] = None
        return state
