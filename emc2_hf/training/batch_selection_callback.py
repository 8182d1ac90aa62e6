"""The trainer's side of batch selection: embed this epoch's views of the training set, hand them to the sampler.

:mod:`emc2_hf.sampling.batch_selection` turns embeddings into batches (spectral clustering, ordered SGD); this module
feeds it. At every epoch start :class:`BatchSelectionCallback` encodes the two training views the collator will draw
this epoch for every example (eval mode, no gradient), each process a contiguous share of the rows, all-gathered so
every process computes the same batches, and calls ``sampler.update``. A checkpoint carries the epoch's batches
(``batch_selection.safetensors``), so a run resumed mid-epoch continues the same batches instead of re-embedding
with the later model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from ..data.images import decode_image
from .distributed import gather_rows, world_size

BATCH_SELECTION_STATE_NAME = "batch_selection.safetensors"


@torch.no_grad()
def embed_training_views(
    model: torch.nn.Module, dataset: Any, collator: Any, device: torch.device, chunk_size: int = 128
) -> torch.Tensor:
    """``FloatTensor[m, 2, d]``: the model's embeddings of both training views of every row, in row order.

    The views are exactly those the collator renders this epoch (its ``view_key_and_slot`` and ``render``), encoded
    in eval mode (BatchNorm with running statistics). Under several processes each encodes rows
    ``[r·m/N, (r+1)·m/N)`` and the parts are all-gathered, so every process returns the same tensor.
    """
    num_rows = len(dataset)
    size = world_size()
    rank = torch.distributed.get_rank() if size > 1 else 0
    start, stop = rank * num_rows // size, (rank + 1) * num_rows // size
    was_training = model.training
    model.eval()
    parts = []
    try:
        for first in range(start, stop, chunk_size):
            rows = [dataset[index] for index in range(first, min(first + chunk_size, stop))]
            pixel_values = []
            for view in (0, 1):
                for row in rows:
                    index = int(row[collator.index_column])
                    image = decode_image(row[collator.image_column], row=index, source="the training set")
                    pixel_values.append(collator.render(image, collator.view_key_and_slot(index, view)[0]))
            embeddings = model(pixel_values=torch.stack(pixel_values).to(device)).embeddings.float()
            parts.append(torch.stack(embeddings.chunk(2), dim=1))  # [n, 2, d]
    finally:
        model.train(was_training)
    local = torch.cat(parts) if parts else torch.empty(0, 2, 0, device=device)
    if size > 1:
        width = torch.tensor([local.shape[-1]], device=device)
        torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)
        if local.shape[0] == 0:
            local = local.new_zeros(0, 2, int(width))
        local = gather_rows(local.contiguous())
    return local


class BatchSelectionCallback(TrainerCallback):
    """At every epoch start, embed the training set's views and let the trainer's batch sampler choose the epoch's
    batches (skipped when a resumed checkpoint already holds this epoch's batches)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        sampler = trainer.batch_sampler
        epoch = int(state.epoch or 0)
        if sampler.selected_epoch == epoch:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        embeddings = embed_training_views(model, trainer.train_dataset, trainer.data_collator, args.device)
        sampler.update(embeddings, trainer.args.inverse_temperature, epoch)


def save_batch_selection_state(sampler: Any, directory: str) -> str:
    """Write ``sampler.state_dict()`` (tensors) into ``directory/batch_selection.safetensors``."""
    path = os.path.join(directory, BATCH_SELECTION_STATE_NAME)
    tensors = {name: value.detach().cpu().contiguous() for name, value in sampler.state_dict().items()}
    save_file(tensors, path, metadata={"format": "pt", "sampler": type(sampler).__name__})
    return path


def load_batch_selection_state(sampler: Any, directory: str) -> None:
    """Restore the sampler's epoch and batches from a checkpoint written with the same ``--batch_selection``."""
    path = os.path.join(directory, BATCH_SELECTION_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: this checkpoint was written without --batch_selection {sampler.name}; resume with "
            "the batch selection that wrote it"
        )
    sampler.load_state_dict(load_file(path))
