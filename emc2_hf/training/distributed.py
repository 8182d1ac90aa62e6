"""Gathering the views of every process, so the objective sees the global batch (open_clip-style)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_functional


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_views(embeddings: torch.Tensor, dataset_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather the two-view embeddings and dataset indices of every process, keeping the autograd graph.

    Args:
        embeddings: ``[2b, d]`` on this process (view 1 of its ``b`` images, then view 2).
        dataset_indices: ``LongTensor[b]``.

    Returns:
        ``([2bN, d], [bN])`` laid out as one batch of ``bN`` images: view 1 of every process's images (rank order),
        then view 2. Every process gets the same tensors, so it computes the same objective and the same per-sample
        state update. The gather's backward sums the gradients that all processes send to this process's
        embeddings; since every process computes the identical loss ``L``, that sum is ``N ∂L/∂e_local``, and DDP's
        averaging over the ``N`` processes turns it into exactly ``∂L/∂θ``.
    """
    size = world_size()
    if size == 1:
        return embeddings, dataset_indices
    num_images = dataset_indices.numel()
    sizes = [torch.zeros(1, dtype=torch.long, device=dataset_indices.device) for _ in range(size)]
    dist.all_gather(sizes, torch.tensor([num_images], device=dataset_indices.device))
    if any(int(s) != num_images for s in sizes):
        raise ValueError(
            f"processes hold different numbers of images per batch ({[int(s) for s in sizes]}); keep "
            "dataloader_drop_last=True so every process gets full batches"
        )
    gathered = distributed_functional.all_gather(embeddings)
    indices = [torch.empty_like(dataset_indices) for _ in range(size)]
    dist.all_gather(indices, dataset_indices)
    first_views = torch.cat([part[:num_images] for part in gathered])
    second_views = torch.cat([part[num_images:] for part in gathered])
    return torch.cat([first_views, second_views]), torch.cat(indices)
