"""The trainer's side of the negative cache (Lindgren et al., 2021): fill, refresh, and re-encode sampled negatives.

The objective (:class:`~emc2_hf.objectives.NegativeCacheObjective`) keeps the cache and draws the negatives; this
module encodes images for it. The cache holds every training image **without augmentation** (``D_neg(x) = D \\ {x}``,
as the EMC² paper runs this baseline), so its images are the collator's ``eval_pixel_values``. Each step:

1. **refresh** the next ``⌈ρ m⌉`` entries round-robin (eval mode, no gradient), once per optimisation step;
2. **draw** ``n`` negatives per anchor view by Gumbel-max from ``β s`` between the anchor — the view encoded now in
   eval mode, without gradient, like the cache's entries — and the cache;
3. **re-encode** the distinct drawn images with gradient *in the views' forward pass* (train mode: BatchNorm sees
   views and negatives together, as EMC²'s re-encoded states) — they become the problem's state columns. The cache
   itself only holds eval-mode embeddings (fill and refresh).

Under several processes every process holds the whole cache and draws the same negatives (same keyed generator,
same gathered anchors); the images to encode are split by process and all-gathered (with autograd for step 3), so
the cache stays identical everywhere. These images are decoded in the training process, not in DataLoader workers:
``B·n + ρ m`` extra images per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data.images import decode_image
from ..objectives import NO_STATE
from .distributed import gather_rows, gather_views, world_size


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


@dataclass
class CacheNegatives:
    """This step's draws, and the images of this process's share of them for the views' forward pass.

    Attributes:
        samples: ``LongTensor[2B, n]``, every gathered anchor view's drawn negatives (dataset indices).
        keys: ``LongTensor[k_r]``, this process's share of the distinct draws (``distinct[r::N]``).
        pixel_values: ``FloatTensor[k_r, 3, H, W]``, their unaugmented images.
    """

    samples: torch.Tensor
    keys: torch.Tensor
    pixel_values: torch.Tensor

    def state_columns(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state-column arguments of :func:`~emc2_hf.objectives.two_view_problem`, from the embeddings of
        :attr:`pixel_values` (``[k_r, d]``, encoded with the views): gathered with autograd across processes."""
        state_keys = gather_rows(self.keys.to(embeddings.device))
        return {
            "state_embeddings": gather_rows(embeddings, differentiable=True),
            "state_keys": state_keys,
            "state_views": torch.full_like(state_keys, NO_STATE),
            # Each anchor "starts" on its first draw: this marks the columns as its negatives in the problem's
            # mask; the objective's weights (counts of every draw / n) are what the surrogate uses.
            "start_keys": self.samples[:, 0],
            "start_views": torch.full_like(self.samples[:, 0], NO_STATE),
        }


def draw_cache_negatives(
    objective: Any,
    model: torch.nn.Module,
    dataset: Any,
    collator: Any,
    inputs: dict[str, torch.Tensor],
    *,
    step: int,
    micro_step: int,
    inverse_temperature: float,
) -> CacheNegatives:
    """Steps 1–2 above, before the views' forward pass: refresh, then draw from the anchors' current embeddings.

    The anchors for the draw are this process's views encoded in eval mode without gradient (as the cache's
    entries are, so the draw's logits compare like with like), gathered across processes; the drawn images are then
    encoded *with* the views, in their forward pass (train mode: BatchNorm normalises views and negatives together,
    as EMC²'s re-encoded states; a separate pass would let the encoder tell the two apart).

    Args:
        inputs: this process's batch (``pixel_values: [2b, 3, H, W]`` and the dataset index column).
    """
    pixel_values = inputs["pixel_values"]
    device = pixel_values.device
    objective.to(device)
    width = objective.cache.embeddings.shape[1]
    if micro_step == 0:
        refresh = objective.refresh_keys(step)
        keys, embeddings = encode_unaugmented(
            model, dataset, collator, refresh, device, with_grad=False, embedding_dim=width
        )
        objective.write_cache(keys, embeddings.detach())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            local_views = model(pixel_values=pixel_values).embeddings.float()
    finally:
        model.train(was_training)
    views, indices = gather_views(local_views, inputs[collator.index_column])
    samples = objective.sample_negatives(
        torch.nn.functional.normalize(views, dim=-1),
        indices.repeat(2),
        step=step,
        micro_step=micro_step,
        inverse_temperature=inverse_temperature,
    )  # [2B, n]
    local_keys = torch.unique(samples).cpu()[_rank() :: world_size()]
    images = [
        decode_image(dataset[index][collator.image_column], row=index, source="the training set")
        for index in local_keys.tolist()
    ]
    height, width_px = pixel_values.shape[-2:]
    local_pixels = (
        collator.eval_pixel_values(images).to(pixel_values)
        if images
        else pixel_values.new_empty(0, 3, height, width_px)
    )
    return CacheNegatives(samples=samples, keys=local_keys, pixel_values=local_pixels)
