"""Make the chain starts a batch carries the objective's current ones, whatever the DataLoader prefetched.

The collator reads each view's chain start from the shared :class:`~emc2_hf.sampling.ChainStateTable` when it
collates, which can be a few steps before the batch trains (Accelerate looks one batch ahead; workers prefetch
``2 × num_workers``). Under an epoch-wise shuffle an example's chains change only when it is in a batch, once per
epoch, so the read is current. A batch selection that repeats examples within an epoch (ordered SGD) can deliver a
start that the previous step already moved: still a valid Metropolis–Hastings start, but then the run depends on
prefetch timing (worker count, and where a resumed run restarted). :func:`current_chain_starts` replaces the
delivered starts by the objective's and renders, in the training process, the state images that the delivered set
lacks — so the state columns are a function of the chains alone and resume stays bit-exact.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.images import decode_image
from ..objectives import states_to_encode


def current_chain_starts(objective: Any, inputs: dict[str, Any], dataset: Any, collator: Any) -> dict[str, Any]:
    """``inputs`` with ``start_index / start_view`` and ``state_pixel_values / state_index / state_view`` as the
    objective's chains say now (unchanged, and no work, when the delivered starts are current).

    Args:
        objective: an objective with ``chain_starts(keys [A], slots [A]) -> (index [A], view [A])`` (EMC²).
        inputs: a batch of :class:`~emc2_hf.ContrastiveCollator` with chain states attached (this process's).
    """
    keys = inputs[collator.index_column].repeat(2)
    slots = inputs["view_slots"]
    index, view = (part.cpu() for part in objective.chain_starts(keys, slots))
    delivered_index, delivered_view = inputs["start_index"].cpu(), inputs["start_view"].cpu()
    if torch.equal(index, delivered_index) and torch.equal(view, delivered_view):
        return inputs
    chained = inputs.get("chain_active")
    state_index, state_view = states_to_encode(
        index, view, keys.cpu(), inputs["view_keys"].cpu(), None if chained is None else chained.cpu()
    )
    delivered = {
        (int(i), int(v)): row
        for row, (i, v) in enumerate(zip(inputs["state_index"].tolist(), inputs["state_view"].tolist(), strict=True))
    }
    pixels = inputs["state_pixel_values"]
    rows = []
    for i, v in zip(state_index.tolist(), state_view.tolist(), strict=True):
        if (i, v) in delivered:
            rows.append(pixels[delivered[(i, v)]])
        else:
            image = decode_image(dataset[i][collator.image_column], row=i, source="the training set")
            rows.append(collator.render(image, v).to(pixels))
    height, width = inputs["pixel_values"].shape[-2:]
    state_pixel_values = torch.stack(rows) if rows else pixels.new_empty(0, 3, height, width)
    device = inputs["start_index"].device
    return {
        **inputs,
        "start_index": index.to(device),
        "start_view": view.to(device),
        "state_index": state_index.to(device),
        "state_view": state_view.to(device),
        "state_pixel_values": state_pixel_values,
    }
