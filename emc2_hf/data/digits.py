"""scikit-learn's bundled handwritten digits as an image dataset: the offline default of the recipes."""

from __future__ import annotations

import datasets
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def load_digits_dataset(image_size: int = 32, test_size: float = 0.3, seed: int = 0) -> datasets.DatasetDict:
    """1,797 grayscale 8×8 digits, upscaled (bilinear) to ``image_size`` px, split stratified into train/test.

    Returns a ``DatasetDict`` with splits ``"train"`` (1,257 rows at the default ``test_size``) and ``"test"`` (540),
    columns ``"image"`` (``datasets.Image``) and ``"label"`` (``ClassLabel`` "0"…"9"). Needs no network.
    """
    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    images = [Image.fromarray(p, mode="L").resize((image_size, image_size), Image.BILINEAR) for p in pixels]
    positions = np.arange(len(images))
    train_positions, test_positions = train_test_split(
        positions, test_size=test_size, random_state=seed, stratify=digits.target
    )
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def split(selected: np.ndarray) -> datasets.Dataset:
        selected = np.sort(selected)
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in selected], "label": digits.target[selected].tolist()}, features=features
        )

    return datasets.DatasetDict({"train": split(train_positions), "test": split(test_positions)})
