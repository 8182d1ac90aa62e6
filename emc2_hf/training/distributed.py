"""Gathering the batch of every process, so the objective sees the global batch (open_clip-style)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shutdown_process_group() -> None:
    """End a run under several processes cleanly: wait for every process, then destroy the process group.

    Call it once every process has finished its work (a process still training would hang the barrier). Without it,
    torch warns at exit that the group was not destroyed, and with gloo on CPU a process can abort in its exit-time
    destructors (``terminate called without an active exception``) after its work is done, which ``torchrun``
    reports as a failed run. A no-op without a process group.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
    sizes = _all_sizes(num_images, dataset_indices.device)
    if any(s != num_images for s in sizes):
        raise ValueError(
            f"processes hold different numbers of images per batch ({sizes}); keep dataloader_drop_last=True so "
            "every process gets full batches"
        )
    return interleave_views(all_gather_with_grad(embeddings), num_images), gather_rows(dataset_indices)


def gather_per_view(values: torch.Tensor) -> torch.Tensor:
    """All-gather a per-view tensor ``[2b, ...]`` (no autograd) into the layout of :func:`gather_views`."""
    if world_size() == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world_size())]
    dist.all_gather(parts, values.contiguous())
    return interleave_views(parts, values.shape[0] // 2)


def interleave_views(parts: list[torch.Tensor] | tuple[torch.Tensor, ...], num_images: int) -> torch.Tensor:
    """``[view 1 of every part, then view 2 of every part]`` from per-process ``[2b, ...]`` parts."""
    return torch.cat([part[:num_images] for part in parts] + [part[num_images:] for part in parts])


def gather_rows(rows: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """All-gather ``[k_r, ...]`` from every process ``r`` (``k_r`` may differ) into ``[Σ k_r, ...]`` in rank order.

    With ``differentiable`` the gather keeps the autograd graph (each row has one owner, so its gradient is counted
    once after DDP's averaging, as in :func:`gather_views`).
    """
    size = world_size()
    if size == 1:
        return rows
    sizes = _all_sizes(rows.shape[0], rows.device)
    longest = max(sizes)
    padded = torch.cat([rows, rows.new_zeros((longest - rows.shape[0], *rows.shape[1:]))]) if longest else rows
    if differentiable:
        parts = all_gather_with_grad(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, sizes, strict=True)])


def all_gather_with_grad(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensor`` (same shape on all), in rank order, differentiable: the backward sums the
    gradients all processes send to each part (a reduce-scatter), so each part's owner receives them."""
    from torch.distributed._functional_collectives import all_gather_single

    gathered = all_gather_single(tensor.contiguous(), 0, dist.group.WORLD)
    return list(gathered.chunk(world_size()))


def _all_sizes(count: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([count], dtype=torch.long, device=device))
    return [int(size) for size in sizes]
