"""Image–text objectives: one objective per direction (image→text, text→image), averaged as CLIP's loss is."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .problem import ImageTextProblems
from .surrogate import ContrastiveObjective, ObjectiveOutput

DIRECTIONS = ("image_to_text", "text_to_image")
"""The two directions, in the order of :class:`~emc2_hf.objectives.ImageTextProblems`."""


class SymmetricObjective(nn.Module):
    """``½ (objective_{image→text} + objective_{text→image})`` over the two problems of an image–text batch.

    Each direction is a full objective with its own per-sample state keyed by dataset index: EMC² keeps one chain
    table per direction (an image's chain walks over captions, a caption's over images), SogCLR one ``u`` per
    direction. With :class:`~emc2_hf.objectives.SimCLRObjective` in both directions the loss is CLIP's symmetric
    InfoNCE, ``½ [CE(β S) + CE(β Sᵀ)]`` with ``S`` the ``b × b`` cosine similarities of images (rows) and texts
    (columns) — transformers' ``clip_loss`` on the same logits, value and gradient (tested), including the gradient
    in a learned ``β = exp(logit_scale)`` carried by the problems.

    Args:
        image_to_text: the objective of image anchors over text candidates.
        text_to_image: the objective of text anchors over image candidates (same class; independent random
            numbers).

    Inputs: :class:`~emc2_hf.objectives.ImageTextProblems` (from :func:`~emc2_hf.objectives.image_text_problems`).
    Outputs: :class:`~emc2_hf.objectives.ObjectiveOutput` whose value is the symmetric InfoNCE of the batch and whose
    metrics are each direction's, prefixed ``image_to_text_`` / ``text_to_image_``.
    """

    def __init__(self, image_to_text: ContrastiveObjective, text_to_image: ContrastiveObjective) -> None:
        super().__init__()
        if type(image_to_text) is not type(text_to_image):
            raise ValueError(
                f"both directions must use one objective, got {type(image_to_text).__name__} and "
                f"{type(text_to_image).__name__}"
            )
        self.image_to_text = image_to_text
        self.text_to_image = text_to_image
        image_to_text.stream, text_to_image.stream = DIRECTIONS

    @property
    def directions(self) -> dict[str, ContrastiveObjective]:
        return {"image_to_text": self.image_to_text, "text_to_image": self.text_to_image}

    @property
    def name(self) -> str:
        return self.image_to_text.name

    @property
    def title(self) -> str:
        return f"{self.image_to_text.title}, both directions (image→text and text→image)"

    @property
    def citation(self) -> str:
        return self.image_to_text.citation

    @property
    def reencodes_chain_states(self) -> bool:
        return self.image_to_text.reencodes_chain_states

    @property
    def reencodes_cache_negatives(self) -> bool:
        return self.image_to_text.reencodes_cache_negatives

    @property
    def inverse_temperature(self) -> float:
        return self.image_to_text.inverse_temperature

    def validate_batch_size(self, num_pairs: int) -> None:
        self.image_to_text.validate_batch_size(num_pairs)

    def forward(self, problems: ImageTextProblems, step: int = 0, micro_step: int = 0) -> ObjectiveOutput:
        if not isinstance(problems, ImageTextProblems):
            raise TypeError(
                "SymmetricObjective takes ImageTextProblems (emc2_hf.objectives.image_text_problems(...)), got "
                f"{type(problems).__name__}"
            )
        outputs = {
            direction: self.directions[direction](problem, step=step, micro_step=micro_step)
            for direction, problem in zip(DIRECTIONS, problems, strict=True)
        }
        metrics: dict[str, torch.Tensor] = {}
        for direction, output in outputs.items():
            metrics.update({f"{direction}_{name}": value for name, value in output.metrics.items()})
        loss = 0.5 * (outputs["image_to_text"].loss + outputs["text_to_image"].loss)
        return ObjectiveOutput(loss=loss, metrics=metrics)

    def _chains(self, settings: dict[str, Any]) -> dict[str, Any]:
        if "chains_per_example" in settings:
            settings["chains_per_example"] = (
                f"{self.image_to_text.chains.num_slots} image→text + {self.text_to_image.chains.num_slots} text→image "
                "(one per caption)"
            )
        return settings

    def get_config_dict(self) -> dict[str, Any]:
        return self._chains({**self.image_to_text.get_config_dict(), "directions": "image→text + text→image"})

    def card_settings(self, global_batch_size: int) -> dict[str, Any]:
        return self._chains(dict(self.image_to_text.card_settings(global_batch_size)))


def build_image_text_objective(
    name: str,
    num_samples: int,
    inverse_temperature: float,
    *,
    seed: int = 0,
    captions_per_pair: int = 1,
    **options: Any,
) -> SymmetricObjective:
    """Both directions of the objective ``name`` (see :func:`~emc2_hf.objectives.build_objective`) for
    ``num_samples`` image–text pairs.

    EMC² keeps one image→text chain per pair and one text→image chain per caption (``captions_per_pair``, the most
    captions a row has: 5 for Flickr30k and COCO), so its state is ``20 · (1 + captions_per_pair)`` bytes per pair.
    """
    from . import build_objective

    if captions_per_pair < 1:
        raise ValueError(f"captions_per_pair must be >= 1, got {captions_per_pair}")
    return SymmetricObjective(
        build_objective(name, num_samples, inverse_temperature, seed=seed, **options, num_slots=1),
        build_objective(name, num_samples, inverse_temperature, seed=seed, **options, num_slots=captions_per_pair),
    )
