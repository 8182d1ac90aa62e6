"""ImageNet-100: the 100-class subset of ImageNet-1k of Tian et al. (2020, CMC), used by the EMC² paper."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

import datasets
import numpy as np

WORDNET_ID = re.compile(r"^n\d{8}$")


@cache
def imagenet100_classes() -> tuple[str, ...]:
    """The 100 WordNet ids of ImageNet-100, in class order (class ``k`` is line ``k`` of the shipped list)."""
    text = files("emc2_hf.data").joinpath("imagenet100_classes.txt").read_text()
    classes = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    assert len(classes) == 100 and len(set(classes)) == 100, "corrupt imagenet100_classes.txt"
    return classes


@cache
def imagenet1k_wordnet_ids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in the standard label order (sorted ids; timm ships the list)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_label_name(index) for index in range(info.num_classes()))


def _label_wordnet_ids(feature: object, label_column: str) -> list[str]:
    """The WordNet id of every label value of the source dataset."""
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names
        if all(WORDNET_ID.match(name) for name in names):
            return list(names)  # an imagefolder of ImageNet class folders
        if len(names) == 1000:
            return list(imagenet1k_wordnet_ids())  # ILSVRC/imagenet-1k: human-readable names, standard order
        raise ValueError(
            f"column {label_column!r} has {len(names)} classes whose names are not WordNet ids (e.g. {names[0]!r}); "
            "ImageNet-100 can be selected from ImageNet-1k (1000 classes in the standard order) or from class "
            "folders named by WordNet id (n01440764, ...). A dataset that already is ImageNet-100 needs no selection: "
            "pass --select_imagenet100 false."
        )
    return list(imagenet1k_wordnet_ids())  # plain integers: ImageNet-1k indices


def select_imagenet100(dataset: datasets.Dataset, label_column: str = "label") -> datasets.Dataset:
    """Keep the rows of an ImageNet dataset whose class is one of ImageNet-100's (:func:`imagenet100_classes`).

    The source may label with ImageNet-1k indices (``ILSVRC/imagenet-1k``) or with WordNet-id class names (an
    ``imagefolder`` of a local ImageNet copy, complete or already cut to the 100 folders). Only the label column is
    read and the result is an index mapping over the source (``Dataset.select``): no image is decoded or copied, and
    labels keep the source's values (probes need consistent classes, not particular numbers); use
    :func:`imagenet100_label_mapping` for labels ``0 … 99``.

    Returns:
        the selected rows, in source order.
    """
    source_ids = _source_wordnet_ids(dataset, label_column)
    mapping = imagenet100_label_mapping(source_ids)
    labels = np.asarray(dataset[label_column], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(mapping)):
        raise ValueError(
            f"labels of column {label_column!r} must be class indices in [0, {len(mapping)}), got values in "
            f"[{labels.min()}, {labels.max()}]"
        )
    keep = np.flatnonzero(mapping[labels] >= 0)
    if keep.size == 0:
        raise ValueError(
            "none of the rows belongs to an ImageNet-100 class; is this ImageNet (labels 0-999 in the standard order, "
            "or class folders named n01440764 ...)?"
        )
    return dataset.select(keep)


def imagenet100_label_mapping(source_wordnet_ids: list[str]) -> np.ndarray:
    """``int64[len(source_wordnet_ids)]``: the ImageNet-100 class of every source label, ``-1`` for the others."""
    target = {wordnet_id: index for index, wordnet_id in enumerate(imagenet100_classes())}
    return np.array([target.get(wordnet_id, -1) for wordnet_id in source_wordnet_ids], dtype=np.int64)


def _source_wordnet_ids(dataset: datasets.Dataset, label_column: str) -> list[str]:
    if label_column not in dataset.column_names:
        raise ValueError(
            f"cannot select ImageNet-100: no column {label_column!r}; the columns are {dataset.column_names}. "
            "Pass --label_column <one of them>."
        )
    return _label_wordnet_ids(dataset.features[label_column], label_column)
