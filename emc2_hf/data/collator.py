"""``ContrastiveCollator``: rows with an image → two augmented views per row and each row's dataset index."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..sampling.random import keyed_generator, keyed_seed
from .augmentations import SimCLRAugmentation
from .images import decode_image


class MissingColumnError(KeyError):
    """A ``KeyError`` whose message prints as written (``KeyError`` would print its ``repr``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class ContrastiveCollator:
    """Data collator for two-view contrastive training, in the style of transformers' data collators.

    ``__call__(rows)`` decodes each row's image (anything :func:`~emc2_hf.data.decode_image` accepts, e.g. a
    ``datasets.Image(decode=False)`` dict), augments it twice independently and returns::

        {"pixel_values": FloatTensor[2b, 3, H, W],  # rows 0…b−1: view 1 of each row; rows b…2b−1: view 2
         index_column: LongTensor[b]}              # each row's dataset index

    so view 1 of row ``k`` is at ``k`` and view 2 at ``k + b``. The index output key is ``index_column``
    (``"dataset_index"`` by default). Bad input raises an error naming the problem and the fix.

    Args:
        augmentation: the random view generator (and the deterministic evaluation transform).
        image_column: the column holding the images.
        index_column: the column holding each row's dataset index (the ContrastiveTrainer adds it).
        seed: if set, view ``v`` of the row with dataset index ``i`` in epoch ``e`` is drawn from a generator seeded by
            ``(seed, e, i, v)``, so a batch's views do not depend on worker count, batch composition or what ran
            before (a resumed run sees the views an uninterrupted one would). ``None``: torch's global RNG.
            The ContrastiveTrainer sets it to ``args.seed`` when unset.
        epoch: the current epoch (the ContrastiveTrainer updates it at every epoch start).
        num_augmentations: if set, every image has only this many fixed augmentations ``g_0 … g_{n−1}`` (keyed by
            ``(seed, i, k)``, the same in every epoch), and each pair of views is two distinct ones of them (always
            ``(g_0, g_1)`` for ``n = 2``): the EMC² paper's "pre-computed augmentations" (|A| = n, Fig. 3 and 7),
            without storing augmented images. ``None``: a fresh pair every epoch ("infinite augmentation").
    """

    augmentation: SimCLRAugmentation = field(default_factory=SimCLRAugmentation)
    image_column: str = "image"
    index_column: str = "dataset_index"
    seed: int | None = None
    epoch: int = 0
    num_augmentations: int | None = None

    def __post_init__(self) -> None:
        if self.num_augmentations is not None and self.num_augmentations < 2:
            raise ValueError(
                f"ContrastiveCollator: num_augmentations={self.num_augmentations} cannot give two different views; "
                "use >= 2, or None for fresh augmentations every epoch"
            )

    @property
    def required_columns(self) -> list[str]:
        """Columns every row must have: ``[image_column, index_column]``."""
        return [self.image_column, self.index_column]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``b ≥ 2`` rows into ``{"pixel_values": [2b, 3, H, W], index_column: [b]}``."""
        self._check_batch_size(len(rows))
        for row in rows:
            self._check_columns(row)
        indices = [int(row[self.index_column]) for row in rows]
        self._check_unique(indices)
        images = [decode_image(row[self.image_column], row=index) for row, index in zip(rows, indices, strict=True)]
        first_views = [self._view(image, index, 0) for image, index in zip(images, indices, strict=True)]
        second_views = [self._view(image, index, 1) for image, index in zip(images, indices, strict=True)]
        return {
            "pixel_values": torch.stack(first_views + second_views),
            self.index_column: torch.tensor(indices, dtype=torch.long),
        }

    def _view(self, image: Image.Image, index: int, view: int) -> torch.Tensor:
        """One augmented view, keyed by ``(seed, epoch, index, view)`` when ``seed`` is set (or, with
        ``num_augmentations``, by the fixed augmentation ``(seed, index, k)`` it uses)."""
        if self.seed is None and self.num_augmentations is None:
            return self.augmentation.train_transform(image)
        seed = self.seed if self.seed is not None else 0
        if self.num_augmentations is None:
            key = keyed_seed(seed, "augmentation", self.epoch, index, view)
        else:
            key = keyed_seed(seed, "fixed-augmentation", index, self._fixed_augmentation(seed, index, view))
        # The CPU generator only (torch.manual_seed would also seed CUDA: ~40× slower): 4 µs per view.
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(key)
        try:
            return self.augmentation.train_transform(image)
        finally:
            generator.set_state(saved)

    def _fixed_augmentation(self, seed: int, index: int, view: int) -> int:
        """Which of the image's ``num_augmentations`` fixed augmentations view ``view`` uses this epoch."""
        if self.num_augmentations == 2:
            return view
        pair = torch.randperm(
            self.num_augmentations, generator=keyed_generator(seed, "augmentation-pair", self.epoch, index)
        )
        return int(pair[view])

    def eval_pixel_values(self, images: list[Any]) -> torch.Tensor:
        """Deterministic pixel values for evaluation (``augmentation.eval_transform``): ``FloatTensor[n, 3, H, W]``."""
        return torch.stack([self.augmentation.eval_transform(image) for image in images])

    def _check_batch_size(self, size: int) -> None:
        if size < 2:
            images = "1 image leaves its anchor" if size == 1 else "0 images leaves"
            raise ValueError(
                f"ContrastiveCollator: a batch of {images} without negatives; contrastive training needs at least 2 "
                "images per batch: raise per_device_train_batch_size, or keep dataloader_drop_last=True so a short "
                "last batch is dropped."
            )

    def _check_columns(self, row: dict[str, Any]) -> None:
        if self.image_column not in row:
            guess = next((name for name, value in row.items() if _looks_like_image(value)), None)
            suggestion = (
                f"Pass image_column={guess!r} (or --image_column {guess})."
                if guess is not None
                else "Pass image_column='<the image column>' (or --image_column <the image column>)."
            )
            raise MissingColumnError(
                f"ContrastiveCollator: no column {self.image_column!r} in the dataset rows; the columns are "
                f"{sorted(row)}. {suggestion}"
            )
        if self.index_column not in row:
            raise MissingColumnError(
                f"ContrastiveCollator: no column {self.index_column!r} (each row's position in the training set) in "
                f"the dataset rows; the columns are {sorted(row)}. The ContrastiveTrainer adds it automatically; "
                f'elsewhere add it with dataset.map(lambda _, i: {{"{self.index_column}": i}}, with_indices=True).'
            )

    def _check_unique(self, indices: list[int]) -> None:
        repeated = sorted(index for index, count in Counter(indices).items() if count > 1)
        if repeated:
            raise ValueError(
                f"ContrastiveCollator: dataset index(es) {repeated} appear more than once in one batch, so an image "
                "would be its own negative. Sample batches without replacement, and make "
                f"{self.index_column!r} unique per row (e.g. re-number it after concatenating datasets)."
            )


def _looks_like_image(value: Any) -> bool:
    if isinstance(value, Image.Image):
        return True
    if isinstance(value, dict):
        return "bytes" in value and "path" in value
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.ndim in (2, 3) and min(value.shape) > 0 and max(value.shape) > 4
    return False
