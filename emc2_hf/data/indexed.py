"""Give every training row its dataset index, the key of per-sample state (EMC²'s chains, SogCLR's u)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import torch


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset of dict rows so row ``i`` also carries ``{index_column: i}``."""

    def __init__(self, dataset: Sequence[dict[str, Any]], index_column: str) -> None:
        self.dataset = dataset
        self.index_column = index_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[index]
        if not isinstance(row, dict):
            raise TypeError(
                f"training rows must be dicts with an image column, got {type(row).__name__} at row {index}"
            )
        return {**row, self.index_column: index}


def with_dataset_index(dataset: Any, image_column: str, index_column: str) -> Any:
    """Prepare a training set for a contrastive objective.

    * ``datasets.Dataset``: checks ``image_column`` exists (listing the columns if not), adds ``index_column`` with
      ``0 … m−1`` unless present, and leaves an ``Image`` column undecoded so the collator decodes it and can name the
      row of an image that fails to decode.
    * any other map-style dataset of dict rows: wrapped in :class:`IndexedDataset`.
    * iterable (streaming) datasets: rejected, since per-sample state needs a fixed size and stable indices.
    """
    if isinstance(dataset, datasets.IterableDataset | torch.utils.data.IterableDataset):
        raise ValueError(
            "contrastive training keeps per-sample state keyed by dataset index, which needs a map-style dataset of "
            "fixed size; load the dataset without streaming=True (or materialise a shard of it)"
        )
    if isinstance(dataset, datasets.Dataset):
        if image_column not in dataset.column_names:
            raise ValueError(
                f"the training set has no column {image_column!r}; its columns are {dataset.column_names}. "
                f"Pass image_column=<one of them> (recipes: --image_column)."
            )
        if len(dataset) < 2:
            raise ValueError(
                f"the training set has {len(dataset)} row(s); contrastive training needs at least 2 images"
            )
        if index_column not in dataset.column_names:
            dataset = dataset.add_column(index_column, list(range(len(dataset))))
        elif dataset[index_column] != list(range(len(dataset))):
            raise ValueError(
                f"column {index_column!r} must hold each row's position 0 … {len(dataset) - 1}; drop it and let the "
                "trainer add it"
            )
        feature = dataset.features[image_column]
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        return dataset
    if len(dataset) < 2:
        raise ValueError(f"the training set has {len(dataset)} row(s); contrastive training needs at least 2 images")
    return IndexedDataset(dataset, index_column)
