"""Small datasets generated in the schema of the real ones (splits, columns, image sizes and formats).

* STL-10 as ``jxie/stl10`` ships it: parquet files ``data/{unlabeled,train,test}-00000-of-00001.parquet`` with an
  ``image`` column (96×96 RGB PNG) and a ``label`` ClassLabel of the 10 STL-10 classes (``-1`` on unlabeled rows).
* ImageNet-100 as ``clane9/imagenet-100`` ships it: ``data/{train,validation}-*.parquet``, JPEG images of varied
  sizes, ``label`` ClassLabel with the 100 human-readable names in ImageNet-100 order.
* A local ImageNet copy: ``DIR/{train,val}/<wnid>/<wnid>_<k>.JPEG`` (an imagefolder), some of its classes outside
  ImageNet-100.

Images carry a class-dependent colour so that probes have something to find.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _image(rng: np.random.Generator, label: int, num_classes: int, size: tuple[int, int]) -> Image.Image:
    width, height = size
    base = np.array([255 * ((label * 37) % num_classes) / num_classes, 255 * (label % 3) / 2, 128], dtype=np.float32)
    pixels = base + rng.normal(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _encoded(image: Image.Image, format: str) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return {"bytes": buffer.getvalue(), "path": None}


def _write_parquet(root: Path, split: str, rows: dict, features: datasets.Features) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(root / "data" / f"{split}-00000-of-00001.parquet")
    )


def make_stl10(root: Path, num_unlabeled: int = 64, num_train: int = 40, num_test: int = 40, seed: int = 0) -> Path:
    """A folder laid out like the ``jxie/stl10`` Hub repository, with 96×96 PNG images."""
    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=STL10_CLASSES)})
    for split, count in (("unlabeled", num_unlabeled), ("train", num_train), ("test", num_test)):
        labels = [-1] * count if split == "unlabeled" else [k % 10 for k in range(count)]
        images = [_encoded(_image(rng, max(label, 0), 10, (96, 96)), "PNG") for label in labels]
        _write_parquet(root, split, {"image": images, "label": labels}, features)
    return root


def _imagenet_size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(120, 260)), int(rng.integers(100, 220))


def make_imagenet100_hub(
    root: Path, names: list[str], num_train: int = 2, num_validation: int = 1, seed: int = 0
) -> Path:
    """A folder laid out like ``clane9/imagenet-100`` (``names``: its 100 class names), JPEGs of varied sizes."""
    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    for split, per_class in (("train", num_train), ("validation", num_validation)):
        labels = [label for label in range(len(names)) for _ in range(per_class)]
        images = [_encoded(_image(rng, label, len(names), _imagenet_size(rng)), "JPEG") for label in labels]
        _write_parquet(root, split, {"image": images, "label": labels}, features)
    return root


def make_imagenet_folder(
    root: Path, wordnet_ids: list[str], num_train: int = 3, num_val: int = 2, seed: int = 0
) -> Path:
    """A local ImageNet copy as an imagefolder: ``root/{train,val}/<wnid>/<wnid>_<k>.JPEG``."""
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", num_train), ("val", num_val)):
        for label, wordnet_id in enumerate(wordnet_ids):
            folder = root / split / wordnet_id
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                _image(rng, label, len(wordnet_ids), _imagenet_size(rng)).save(folder / f"{wordnet_id}_{k}.JPEG")
    return root
