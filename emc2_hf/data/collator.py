"""``ContrastiveCollator``: rows with an image → two augmented views per row and each row's dataset index."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .augmentations import SimCLRAugmentation
from .images import decode_image


@dataclass
class ContrastiveCollator:
    """Data collator for two-view contrastive training, in the style of transformers' collators.

    ``__call__(rows)`` returns::

        {"pixel_values": FloatTensor[2b, 3, H, W],   # rows 0…b−1: view 1 of each row; rows b…2b−1: view 2
         "dataset_index": LongTensor[b]}            # each row's index in the training set

    Images are decoded here (PIL, arrays, ``datasets`` image dicts, bytes or paths), converted to RGB, and
    augmented independently twice. Bad input raises an error naming the problem and the fix.

    Args:
        augmentation: the random view generator (and the deterministic evaluation transform).
        image_column: the column holding the images.
        index_column: the column holding each row's dataset index (the ContrastiveTrainer adds it).
    """

    augmentation: SimCLRAugmentation = field(default_factory=SimCLRAugmentation)
    image_column: str = "image"
    index_column: str = "dataset_index"

    @property
    def required_columns(self) -> list[str]:
        return [self.image_column, self.index_column]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if len(rows) < 2:
            raise ValueError(
                f"a batch of {len(rows)} image leaves its anchor without negatives; contrastive training needs at "
                "least 2 images per batch: raise per_device_train_batch_size, or keep dataloader_drop_last=True so a "
                "short last batch is dropped"
            )
        first = rows[0]
        if self.image_column not in first:
            raise KeyError(
                f"ContrastiveCollator: no column {self.image_column!r} in the dataset rows; the columns are "
                f"{sorted(first)}. Pass image_column=<the image column> (recipes: --image_column)."
            )
        if self.index_column not in first:
            raise KeyError(
                f"ContrastiveCollator: no column {self.index_column!r} (each row's dataset index). ContrastiveTrainer "
                "adds it; elsewhere add it with dataset.map(lambda _, i: {'"
                + self.index_column
                + "': i}, with_indices=True)."
            )
        indices = [int(row[self.index_column]) for row in rows]
        if len(set(indices)) != len(indices):
            duplicates = sorted({index for index in indices if indices.count(index) > 1})
            raise ValueError(
                f"dataset indices {duplicates} appear twice in one batch, so an image would be its own negative; "
                "sample batches without replacement"
            )
        images = [decode_image(row[self.image_column], row=index) for row, index in zip(rows, indices, strict=False)]
        first_views = [self.augmentation.train_transform(image) for image in images]
        second_views = [self.augmentation.train_transform(image) for image in images]
        return {
            "pixel_values": torch.stack(first_views + second_views),
            self.index_column: torch.tensor(indices, dtype=torch.long),
        }

    def eval_pixel_values(self, images: list[Any]) -> torch.Tensor:
        """Deterministic pixel values for evaluation: ``FloatTensor[n, 3, H, W]``."""
        return torch.stack([self.augmentation.eval_transform(decode_image(image)) for image in images])
