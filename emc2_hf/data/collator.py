"""``ContrastiveCollator``: rows with an image → two augmented views per row, their keys, and chain-state images."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..objectives.problem import NO_STATE, states_to_encode
from ..sampling.random import chain_selection, keyed_generator, keyed_seed, keyed_transform
from ..sampling.sample_state import ChainStateTable
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
    ``datasets.Image(decode=False)`` dict), augments it twice and returns::

        {"pixel_values": FloatTensor[2b, 3, H, W],  # rows 0…b−1: view 1 of each row; rows b…2b−1: view 2
         index_column: LongTensor[b],               # each row's dataset index
         "view_keys": LongTensor[2b],               # what re-creates each view (its augmentation seed)
         "view_slots": LongTensor[2b]}              # the state slot of each view (which of the image's chains)

    so view 1 of row ``k`` is at ``k`` and view 2 at ``k + b``. Bad input raises an error naming the problem and the
    fix.

    **Chain-state images.** When the trainer attaches EMC²'s chain table (:meth:`attach_chain_states`), the collator
    also reads where each view's chain starts and delivers, with the batch, the state images the batch does not hold
    — each the *training view* the chain stored, re-created from its view key — so reading and augmenting them happens
    in the DataLoader workers::

         "start_index": LongTensor[2b], "start_view": LongTensor[2b],   # each view's chain state
         "chain_active": BoolTensor[2b],                                # whose chain runs (chain_fraction)
         "state_pixel_values": FloatTensor[k, 3, H, W],                 # the k ≤ 2b states to re-encode
         "state_index": LongTensor[k], "state_view": LongTensor[k]

    Args:
        augmentation: the random view generator (and the deterministic evaluation transform).
        image_column: the column holding the images.
        index_column: the column holding each row's dataset index (the ContrastiveTrainer adds it).
        seed: if set, view ``v`` of the row with dataset index ``i`` in epoch ``e`` is drawn from a generator seeded by
            the key ``(seed, e, i, v)``, so a batch's views do not depend on worker count, batch composition or what
            ran before (a resumed run sees the views an uninterrupted one would), and any view can be re-created from
            its key. ``None``: torch's global RNG (views cannot be re-created). The ContrastiveTrainer sets it to
            ``args.seed`` when unset.
        epoch: the current epoch (the ContrastiveTrainer updates it at every epoch start).
        num_augmentations: if set, every image has only this many fixed augmentations ``g_0 … g_{n−1}`` (keyed by
            ``(seed, i, k)``, the same in every epoch), and each pair of views is two distinct ones of them (always
            ``(g_0, g_1)`` for ``n = 2``; a uniform pair per epoch otherwise): the EMC² paper's "pre-computed
            augmentations" (|A| = n, Fig. 3 and 7), without storing augmented images. A view's state slot is its
            augmentation ``k``. ``None``: a fresh pair every epoch ("infinite augmentation"); slots are 0 and 1.
    """

    augmentation: SimCLRAugmentation = field(default_factory=SimCLRAugmentation)
    image_column: str = "image"
    index_column: str = "dataset_index"
    seed: int | None = None
    epoch: int = 0
    num_augmentations: int | None = None
    chain_states: ChainStateTable | None = field(default=None, repr=False)
    state_source: Any = field(default=None, repr=False)
    chain_fraction: float = 1.0

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

    @property
    def num_state_slots(self) -> int:
        """State slots (chains) per example: the fixed augmentations, or the two fresh views."""
        return self.num_augmentations if self.num_augmentations is not None else 2

    def attach_chain_states(self, table: ChainStateTable, dataset: Any, chain_fraction: float = 1.0) -> None:
        """Deliver chain-state images: read starts from ``table`` and state images from ``dataset`` (the training
        set, indexed by dataset index). Needs ``seed`` (views must be re-creatable from their keys). With
        ``chain_fraction < 1`` only the chains :func:`~emc2_hf.sampling.chain_selection` picks this epoch run, and
        only their states are delivered (``"chain_active": BoolTensor[2b]``)."""
        if self.seed is None and self.num_augmentations is None:
            raise ValueError(
                "ContrastiveCollator: chain-state images need re-creatable views; set seed (the ContrastiveTrainer "
                "sets it to args.seed)"
            )
        if table.state_index.shape[1] != self.num_state_slots:
            raise ValueError(
                f"the chain table has {table.state_index.shape[1]} slot(s) per example but the collator makes "
                f"{self.num_state_slots} (num_augmentations={self.num_augmentations}); build the objective with "
                f"num_slots={self.num_state_slots}"
            )
        self.chain_states, self.state_source, self.chain_fraction = table, dataset, float(chain_fraction)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``b ≥ 2`` rows into ``{"pixel_values": [2b, 3, H, W], index_column: [b], ...}`` (see above)."""
        self._check_batch_size(len(rows))
        for row in rows:
            self._check_columns(row)
        indices = [int(row[self.index_column]) for row in rows]
        self._check_unique(indices)
        images = [
            decode_image(row[self.image_column], row=index, source="the training set")
            for row, index in zip(rows, indices, strict=True)
        ]
        keys, slots = [], []
        for view in (0, 1):
            for index in indices:
                key, slot = self.view_key_and_slot(index, view)
                keys.append(key)
                slots.append(slot)
        pixel_values = [self.render(image, key) for image, key in zip(images + images, keys, strict=True)]
        batch = {
            "pixel_values": torch.stack(pixel_values),
            self.index_column: torch.tensor(indices, dtype=torch.long),
            "view_keys": torch.tensor(keys, dtype=torch.long),
            "view_slots": torch.tensor(slots, dtype=torch.long),
        }
        if self.chain_states is not None:
            batch.update(self._chain_state_images(batch))
        return batch

    def view_key_and_slot(self, index: int, view: int) -> tuple[int, int]:
        """``(view key, state slot)`` of view ``view`` (0 or 1) of the image with dataset index ``index`` this epoch.

        The key is the seed :meth:`render` draws the augmentation from: ``(seed, epoch, index, view)`` for fresh
        views, ``(seed, index, k)`` for fixed augmentation ``k`` (whose slot is ``k``). ``NO_STATE`` when views are
        not keyed (``seed=None`` with fresh views).
        """
        if self.num_augmentations is None:
            if self.seed is None:
                return NO_STATE, view
            return keyed_seed(self.seed, "augmentation", self.epoch, index, view), view
        augmentation = self._fixed_augmentation(self.seed if self.seed is not None else 0, index, view)
        return self.fixed_augmentation_key(index, augmentation), augmentation

    def fixed_augmentation_key(self, index: int, augmentation: int) -> int:
        """The view key of fixed augmentation ``augmentation`` (``0 … num_augmentations − 1``) of image ``index``."""
        return keyed_seed(self.seed if self.seed is not None else 0, "fixed-augmentation", index, augmentation)

    def render(self, image: Image.Image, key: int) -> torch.Tensor:
        """The training view of ``image`` drawn with the augmentation seed ``key`` (``NO_STATE``: torch's global RNG).

        Returns:
            ``FloatTensor[3, H, W]``; the same key always gives the same view.
        """
        return keyed_transform(self.augmentation.train_transform, image, key)

    def _fixed_augmentation(self, seed: int, index: int, view: int) -> int:
        """Which of the image's ``num_augmentations`` fixed augmentations view ``view`` uses this epoch."""
        if self.num_augmentations == 2:
            return view
        pair = torch.randperm(
            self.num_augmentations, generator=keyed_generator(seed, "augmentation-pair", self.epoch, index)
        )
        return int(pair[view])

    def _chain_state_images(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each view's chain start, and the images of the starts this batch does not hold (see the class doc)."""
        view_indices = batch[self.index_column].repeat(2)
        start_index, start_view = self.chain_states.read(view_indices, batch["view_slots"])
        chained = chain_selection(self.seed, self.epoch, view_indices, batch["view_slots"], self.chain_fraction)
        state_index, state_view = states_to_encode(start_index, start_view, view_indices, batch["view_keys"], chained)
        height, width = batch["pixel_values"].shape[-2:]
        state_pixel_values = batch["pixel_values"].new_empty(0, 3, height, width)
        if state_index.numel():
            images = [
                decode_image(
                    self.state_source[int(index)][self.image_column], row=int(index), source="the training set"
                )
                for index in state_index.tolist()
            ]
            state_pixel_values = torch.stack(
                [self.render(image, key) for image, key in zip(images, state_view.tolist(), strict=True)]
            )
        return {
            "chain_active": chained,
            "start_index": start_index,
            "start_view": start_view,
            "state_pixel_values": state_pixel_values,
            "state_index": state_index,
            "state_view": state_view,
        }

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
        check_index_column(row, self.index_column, "ContrastiveCollator")

    def _check_unique(self, indices: list[int]) -> None:
        check_unique_indices(indices, self.index_column, "ContrastiveCollator", "an image")


def check_index_column(row: dict[str, Any], index_column: str, collator: str) -> None:
    """Raise :class:`MissingColumnError` naming the fix when ``row`` lacks the dataset-index column."""
    if index_column not in row:
        raise MissingColumnError(
            f"{collator}: no column {index_column!r} (each row's position in the training set) in "
            f"the dataset rows; the columns are {sorted(row)}. The ContrastiveTrainer adds it automatically; "
            f'elsewhere add it with dataset.map(lambda _, i: {{"{index_column}": i}}, with_indices=True).'
        )


def check_unique_indices(indices: list[int], index_column: str, collator: str, example: str) -> None:
    """Refuse a batch in which a dataset index repeats (``example`` would be its own negative)."""
    repeated = sorted(index for index, count in Counter(indices).items() if count > 1)
    if repeated:
        raise ValueError(
            f"{collator}: dataset index(es) {repeated} appear more than once in one batch, so {example} "
            "would be its own negative. Sample batches without replacement, and make "
            f"{index_column!r} unique per row (e.g. re-number it after concatenating datasets)."
        )


def _looks_like_image(value: Any) -> bool:
    if isinstance(value, Image.Image):
        return True
    if isinstance(value, dict):
        return "bytes" in value and "path" in value
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.ndim in (2, 3) and min(value.shape) > 0 and max(value.shape) > 4
    return False
