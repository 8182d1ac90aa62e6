"""The similarity structure of a batch of ``b`` images seen through two augmented views.

Views are laid out as in SimCLR: anchor/candidate ``k`` is view 1 of the batch's image ``k`` and ``k + b`` is view 2
of the same image. Every view is an anchor; its positive is the other view of its image; its negatives are the
``2b − 2`` views of the other images (paper, Figure 2).

Optionally ``k`` extra candidates follow the views as columns ``2b … 2b + k − 1``: embeddings of other training images
(EMC²'s exact mode re-encodes the chain states that are not in the batch). They are candidates only, never anchors,
and a negative of every anchor whose image differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ViewPairs:
    """Similarities of the ``2b`` views of a batch to its candidates, and which pairs are positive or negative.

    Attributes:
        similarities: ``FloatTensor[2b, 2b + k]``, cosine similarities ``s_ac = z_aᵀ z_c`` of L2-normalised float32
            embeddings (differentiable): anchors are the views, candidates the views then the extra candidates.
        positive_columns: ``LongTensor[2b]``, column of each anchor's positive (``a ± b``).
        negative_mask: ``BoolTensor[2b, 2b + k]``, ``True`` for the negatives of each anchor (self, positive and an
            extra candidate of the anchor's own image excluded).
        image_positions: ``LongTensor[2b]``, position ``0 … b−1`` of each view's image in the batch.
        dataset_indices: ``LongTensor[b]``, dataset index of each image (the key of per-sample state).
        extra_dataset_indices: ``LongTensor[k]``, dataset index of each extra candidate (empty without extras).
    """

    similarities: torch.Tensor
    positive_columns: torch.Tensor
    negative_mask: torch.Tensor
    image_positions: torch.Tensor
    dataset_indices: torch.Tensor
    extra_dataset_indices: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return self.dataset_indices.numel()

    @property
    def num_views(self) -> int:
        """``2b``, the number of anchors (and of in-batch candidate columns)."""
        return 2 * self.num_images

    @property
    def anchor_dataset_indices(self) -> torch.Tensor:
        """``LongTensor[2b]``, dataset index of each anchor's image (both views share it)."""
        return self.dataset_indices[self.image_positions]

    @property
    def candidate_dataset_indices(self) -> torch.Tensor:
        """``LongTensor[2b + k]``, dataset index of each candidate column's image."""
        extra = self.extra_dataset_indices if self.extra_dataset_indices is not None else self.dataset_indices[:0]
        return torch.cat([self.dataset_indices, self.dataset_indices, extra])

    @property
    def in_batch_negative_mask(self) -> torch.Tensor:
        """``BoolTensor[2b, 2b]``, the ``2b − 2`` in-batch negatives of each anchor (extra candidates left out)."""
        return self.negative_mask[:, : self.num_views]

    @property
    def self_mask(self) -> torch.Tensor:
        """``BoolTensor[2b, 2b]``, the diagonal (a view is never its own candidate)."""
        return torch.eye(2 * self.num_images, dtype=torch.bool, device=self.similarities.device)


def pair_views(
    embeddings: torch.Tensor,
    dataset_indices: torch.Tensor,
    extra_embeddings: torch.Tensor | None = None,
    extra_dataset_indices: torch.Tensor | None = None,
) -> ViewPairs:
    """Build :class:`ViewPairs` from ``embeddings: [2b, d]`` (view 1 of all images, then view 2) in any dtype.

    Embeddings are upcast to float32 and L2-normalised, so the objectives run in float32 under autocast.

    Args:
        embeddings: ``[2b, d]``, the views (anchors and in-batch candidates).
        dataset_indices: ``LongTensor[b]``.
        extra_embeddings: optional ``[k, d]``, extra candidate columns appended after the views.
        extra_dataset_indices: ``LongTensor[k]``, their dataset indices (required with ``extra_embeddings``).
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
    if (extra_embeddings is None) != (extra_dataset_indices is None):
        raise ValueError("extra_embeddings and extra_dataset_indices go together: pass both or neither")
    device = embeddings.device
    dataset_indices = dataset_indices.to(device=device, dtype=torch.long)
    normalised = F.normalize(embeddings.float(), dim=-1)
    image_positions = torch.arange(num_views, device=device) % num_images
    positive_columns = (torch.arange(num_views, device=device) + num_images) % num_views
    same_image = image_positions[:, None] == image_positions[None, :]
    if extra_embeddings is None:
        similarities = normalised @ normalised.t()
        negative_mask = ~same_image
    else:
        extra_dataset_indices = extra_dataset_indices.to(device=device, dtype=torch.long)
        if extra_embeddings.ndim != 2 or extra_embeddings.shape[0] != extra_dataset_indices.numel():
            raise ValueError(
                f"extra_embeddings must be [k = {extra_dataset_indices.numel()}, d] (one row per extra dataset "
                f"index), got shape {tuple(extra_embeddings.shape)}"
            )
        candidates = torch.cat([normalised, F.normalize(extra_embeddings.float(), dim=-1)])
        similarities = normalised @ candidates.t()
        anchor_indices = dataset_indices[image_positions]
        negative_mask = torch.cat([~same_image, anchor_indices[:, None] != extra_dataset_indices[None, :]], dim=1)
    return ViewPairs(
        similarities=similarities,
        positive_columns=positive_columns,
        negative_mask=negative_mask,
        image_positions=image_positions,
        dataset_indices=dataset_indices,
        extra_dataset_indices=extra_dataset_indices,
    )
