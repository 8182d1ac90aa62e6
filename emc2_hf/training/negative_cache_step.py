"""The trainer's side of the negative cache (Lindgren et al., 2021): fill, refresh, and re-encode sampled negatives.

The objective (:class:`~emc2_hf.objectives.NegativeCacheObjective`) keeps the cache and draws the negatives; this
module encodes images for it. The cache holds every training image **without augmentation** (``D_neg(x) = D \\ {x}``,
as the EMC² paper runs this baseline), so its images are the collator's ``eval_pixel_values``. Each step:

1. **refresh** the next ``⌈ρ m⌉`` entries round-robin (eval mode, no gradient), once per optimisation step;
2. **sample** ``n`` negatives per anchor view by Gumbel-max from ``β s`` between the current (detached) anchor and
   the cache;
3. **re-encode** the distinct sampled images with gradient — in eval mode, as the cache's entries are (BatchNorm with
   running statistics: the draws of a step can be a handful of images, or one) — they become the problem's state
   columns, and their fresh embeddings are written back into the cache. The EMC² reference code runs this baseline
   without BatchNorm; a batch-free encoder (``--backbone_kwargs '{"norm_layer": "groupnorm"}'
   --projection_batch_norm false``) removes the difference between the two modes.

Under several processes every process holds the whole cache and draws the same negatives (same keyed generator,
same gathered anchors); the images to encode are split by process and all-gathered (with autograd for step 3), so
the cache stays identical everywhere. These images are decoded in the training process, not in DataLoader workers:
``B·n + ρ m`` extra images per step.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.images import decode_image
from ..objectives import NO_STATE
from .distributed import gather_rows, world_size


def _rank() -> int:
    return torch.distributed.get_rank() if world_size() > 1 else 0


def encode_unaugmented(
    model: torch.nn.Module,
    dataset: Any,
    collator: Any,
    keys: torch.Tensor,
    device: torch.device,
    *,
    with_grad: bool,
    embedding_dim: int,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the unaugmented images of ``keys`` (dataset rows), split across processes and all-gathered.

    Returns ``(keys [k], embeddings [k, d])`` in the gathered order (rank order of the shares ``keys[r::N]``).
    Always in eval mode — BatchNorm with its running statistics, like the cache's own entries, so an image's embedding
    does not depend on which other draws share its forward pass (and a single draw is no batch-of-one error);
    ``with_grad``: with autograd (the gather keeps the graph).
    """
    local_keys = keys.cpu()[_rank() :: world_size()]
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.set_grad_enabled(with_grad):
            for first in range(0, local_keys.numel(), chunk_size):
                chunk = local_keys[first : first + chunk_size].tolist()
                images = [
                    decode_image(dataset[index][collator.image_column], row=index, source="the training set")
                    for index in chunk
                ]
                pixel_values = collator.eval_pixel_values(images).to(device)
                parts.append(model(pixel_values=pixel_values).embeddings.float())
            if not parts:  # this process has no share this step
                parts.append(torch.zeros(0, embedding_dim, device=device))
    finally:
        model.train(was_training)
    embeddings = torch.cat(parts)
    gathered_keys = gather_rows(local_keys.to(device))
    return gathered_keys, gather_rows(embeddings, differentiable=with_grad)


def fill_cache(objective: Any, model: torch.nn.Module, dataset: Any, collator: Any, device: torch.device) -> int:
    """Embed every entry the cache does not hold yet (all of them at the start of training); returns how many."""
    cache = objective.cache
    missing = (~cache.filled).nonzero().squeeze(1)
    if missing.numel():
        keys, embeddings = encode_unaugmented(
            model, dataset, collator, missing, device, with_grad=False, embedding_dim=cache.embeddings.shape[1]
        )
        objective.write_cache(keys.to(cache.embeddings.device), embeddings.detach())
    return int(missing.numel())


def cache_state_columns(
    objective: Any,
    model: torch.nn.Module,
    dataset: Any,
    collator: Any,
    view_embeddings: torch.Tensor,
    dataset_indices: torch.Tensor,
    *,
    step: int,
    micro_step: int,
    inverse_temperature: float,
) -> dict[str, torch.Tensor]:
    """Steps 1–3 above for the global batch; returns the state-column arguments of
    :func:`~emc2_hf.objectives.two_view_problem`.

    Args:
        view_embeddings: ``[2B, d]``, the gathered views (view 1 of every image, then view 2).
        dataset_indices: ``LongTensor[B]``.
    """
    device = view_embeddings.device
    width = view_embeddings.shape[1]
    objective.to(device)
    if micro_step == 0:
        refresh = objective.refresh_keys(step)
        keys, embeddings = encode_unaugmented(
            model, dataset, collator, refresh, device, with_grad=False, embedding_dim=width
        )
        objective.write_cache(keys, embeddings.detach())
    anchors = torch.nn.functional.normalize(view_embeddings.detach().float(), dim=-1)
    anchor_keys = dataset_indices.repeat(2)
    samples = objective.sample_negatives(
        anchors, anchor_keys, step=step, micro_step=micro_step, inverse_temperature=inverse_temperature
    )  # [2B, n]
    distinct = torch.unique(samples)
    state_keys, state_embeddings = encode_unaugmented(
        model, dataset, collator, distinct, device, with_grad=True, embedding_dim=width
    )
    objective.write_cache(state_keys, state_embeddings.detach())
    no_view = torch.full_like(state_keys, NO_STATE)
    return {
        "state_embeddings": state_embeddings,
        "state_keys": state_keys,
        "state_views": no_view,
        # Each anchor "starts" on its first sample: this marks the columns as its negatives in the problem's mask;
        # the objective's weights (counts of every sample / n) are what the surrogate uses.
        "start_keys": samples[:, 0],
        "start_views": torch.full_like(samples[:, 0], NO_STATE),
    }
