"""The similarity structure of a batch of ``b`` images seen through two augmented views.

Views are laid out as in SimCLR: anchor/candidate ``k`` is view 1 of the batch's image ``k`` and ``k + b`` is view 2
of the same image. Every view is an anchor; its positive is the other view of its image; its negatives are the
``2b − 2`` views of the other images (paper, Figure 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ViewPairs:
    """Similarities between the ``2b`` views of a batch and which pairs are positive or negative.

    Attributes:
        similarities: ``FloatTensor[2b, 2b]``, cosine similarities ``s_ac = z_aᵀ z_c`` of L2-normalised float32
            embeddings (differentiable).
        positive_columns: ``LongTensor[2b]``, column of each anchor's positive (``a ± b``).
        negative_mask: ``BoolTensor[2b, 2b]``, ``True`` for the negatives of each anchor (self and positive excluded).
        image_positions: ``LongTensor[2b]``, position ``0 … b−1`` of each view's image in the batch.
        dataset_indices: ``LongTensor[b]``, dataset index of each image (the key of per-sample state).
    """

    similarities: torch.Tensor
    positive_columns: torch.Tensor
    negative_mask: torch.Tensor
    image_positions: torch.Tensor
    dataset_indices: torch.Tensor

    @property
    def num_images(self) -> int:
        return self.dataset_indices.numel()

    @property
    def anchor_dataset_indices(self) -> torch.Tensor:
        """``LongTensor[2b]``, dataset index of each anchor's image (both views share it)."""
        return self.dataset_indices[self.image_positions]

    @property
    def self_mask(self) -> torch.Tensor:
        """``BoolTensor[2b, 2b]``, the diagonal (a view is never its own candidate)."""
        return torch.eye(2 * self.num_images, dtype=torch.bool, device=self.similarities.device)


def pair_views(embeddings: torch.Tensor, dataset_indices: torch.Tensor) -> ViewPairs:
    """Build :class:`ViewPairs` from ``embeddings: [2b, d]`` (view 1 of all images, then view 2) in any dtype.

    Embeddings are upcast to float32 and L2-normalised, so the objectives run in float32 under autocast.
    """
    num_views = embeddings.shape[0]
    num_images = dataset_indices.numel()
    if num_views != 2 * num_images:
        raise ValueError(
            f"expected embeddings for 2 views of each of the {num_images} images (shape [{2 * num_images}, d]), "
            f"got shape {tuple(embeddings.shape)}"
        )
    if num_images < 2:
        raise ValueError(
            f"a batch of {num_images} image leaves its anchors without negatives; contrastive training needs at least "
            "2 images per batch (raise per_device_train_batch_size or keep dataloader_drop_last=True)"
        )
    device = embeddings.device
    normalised = F.normalize(embeddings.float(), dim=-1)
    similarities = normalised @ normalised.t()
    image_positions = torch.arange(num_views, device=device) % num_images
    positive_columns = (torch.arange(num_views, device=device) + num_images) % num_views
    same_image = image_positions[:, None] == image_positions[None, :]
    return ViewPairs(
        similarities=similarities,
        positive_columns=positive_columns,
        negative_mask=~same_image,
        image_positions=image_positions,
        dataset_indices=dataset_indices.to(device=device, dtype=torch.long),
    )
