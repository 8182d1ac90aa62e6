"""The exact global contrastive loss (1) on a finite dataset of images with fixed views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(anchors: torch.Tensor, candidates: torch.Tensor, anchor_start: int, num_views: int, beta: float):
    """Sum over the chunk's anchors of ``log Σ_{neg} exp(β s) − β · mean_{a' ≠ a} s(anchor, view a' of its image)``."""
    num_anchors = anchors.shape[0]
    logits = beta * anchors @ candidates.t()  # [c, m·A]
    anchor_rows = torch.arange(anchor_start, anchor_start + num_anchors, device=anchors.device)
    anchor_image = anchor_rows // num_views
    candidate_image = torch.arange(candidates.shape[0], device=anchors.device) // num_views
    same_image = anchor_image[:, None] == candidate_image[None, :]
    log_normaliser = torch.logsumexp(logits.masked_fill(same_image, float("-inf")), dim=1)
    positive_mask = same_image & (anchor_rows[:, None] != torch.arange(candidates.shape[0], device=anchors.device))
    positive_logit = (logits * positive_mask).sum(dim=1) / (num_views - 1)
    return (log_normaliser - positive_logit).sum()


def global_contrastive_loss(features: torch.Tensor, inverse_temperature: float, chunk_size: int = 512) -> torch.Tensor:
    """The global contrastive loss (1) with ``D_pos``/``D_neg`` of eq. (21) for ``m`` images × ``A`` fixed views.

    ``L = mean_{i, a ≠ a'} [ −β s(x_i^a, x_i^{a'}) + log Σ_{j ≠ i, c} exp(β s(x_i^a, x_j^c)) ]``: positives are the
    ordered pairs of distinct views of an image; the negatives of a view are every view of every other image.

    Differentiable; anchors are processed ``chunk_size`` rows at a time under activation checkpointing, so memory is
    ``O(chunk_size · m · A)`` rather than ``O((m · A)²)`` (m = 2,000 images × 2 views fits easily on a CPU).

    Args:
        features: ``FloatTensor[m, A, d]`` (``A ≥ 2``), L2-normalised here.
        inverse_temperature: ``β``.
        chunk_size: anchors per chunk.
    """
    if features.ndim != 3 or features.shape[1] < 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [m >= 2 images, A >= 2 views, d], got {tuple(features.shape)}")
    num_images, num_views, _ = features.shape
    flat = F.normalize(features.float(), dim=-1).reshape(num_images * num_views, -1)
    total = flat.new_zeros(())
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start : start + chunk_size]
        if torch.is_grad_enabled() and flat.requires_grad:
            total = total + checkpoint(
                _chunk_loss, chunk, flat, start, num_views, inverse_temperature, use_reentrant=False
            )
        else:
            total = total + _chunk_loss(chunk, flat, start, num_views, inverse_temperature)
    return total / flat.shape[0]
