"""scikit-learn's bundled handwritten digits as an image dataset: the offline default of the recipes."""

from __future__ import annotations

import datasets
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def load_digits_dataset(image_size: int = 32, test_size: float = 0.3, seed: int = 0) -> datasets.DatasetDict:
    """scikit-learn's 1,797 grayscale 8×8 digits as a ``DatasetDict`` of images; needs no network.

    Pixel values 0…16 are scaled to 0…255 (uint8) and each image is upscaled (bilinear) to ``image_size`` px. The rows
    are split stratified by label with ``seed``: at the default ``test_size=0.3``, 1,257 ``"train"`` and 540
    ``"test"`` rows, each split in scikit-learn's order.

    Returns:
        ``DatasetDict`` with splits ``"train"`` and ``"test"``, columns ``"image"`` (``datasets.Image``, mode ``"L"``,
        ``image_size × image_size``) and ``"label"`` (``datasets.ClassLabel`` named ``"0"`` … ``"9"``).
    """
    if image_size < 1:
        raise ValueError(f"load_digits_dataset: image_size={image_size!r} must be a positive number of pixels.")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"load_digits_dataset: test_size={test_size!r} must be a fraction in (0, 1).")
    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # [1797, 8, 8]
    images = [Image.fromarray(p).resize((image_size, image_size), Image.Resampling.BILINEAR) for p in pixels]
    train_positions, test_positions = train_test_split(
        np.arange(len(images)), test_size=test_size, random_state=seed, stratify=digits.target
    )
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def split(positions: np.ndarray) -> datasets.Dataset:
        positions = np.sort(positions)
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in positions], "label": digits.target[positions].tolist()}, features=features
        )

    return datasets.DatasetDict({"train": split(train_positions), "test": split(test_positions)})
