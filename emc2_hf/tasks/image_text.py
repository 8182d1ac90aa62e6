"""Image–text pairs: encode a batch and the chain states it carries with a dual encoder, build both problems.

A batch from :class:`~emc2_hf.data.ImageTextCollator` holds ``b`` images and ``b`` captions (and, for EMC², the
``k_i`` state images and ``k_t`` state captions its chains start from). They are encoded in **one** forward pass
of the model (``model(pixel_values=[b + k_i], input_ids=[b + k_t])``, through DistributedDataParallel when it wraps
the model, so gradients are synchronised), the local features are gathered from every process with autograd, and
:func:`~emc2_hf.objectives.image_text_problems` makes the image→text and text→image problems with the scale
``β = exp(logit_scale)`` (learned) or the fixed ``inverse_temperature``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..objectives import ImageTextProblems, image_text_problems
from ..training.distributed import gather_rows

MAX_LOGIT_SCALE = math.log(100.0)
"""open_clip's clamp of the learned logit scale: ``β = exp(logit_scale) ≤ 100``."""

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def logit_scale_parameter(model: nn.Module) -> nn.Parameter:
    """The dual encoder's learned ``logit_scale`` (``VisionTextDualEncoderModel``, ``CLIPModel``)."""
    model = getattr(model, "module", model)
    scale = getattr(model, "logit_scale", None)
    if not isinstance(scale, torch.Tensor):
        raise ValueError(
            f"{type(model).__name__} has no logit_scale to learn; pass --learn_logit_scale false to use a fixed "
            "--inverse_temperature"
        )
    return scale


def _concatenated_text_inputs(inputs: dict[str, Any], with_states: bool) -> dict[str, torch.Tensor]:
    text = {}
    for name in TEXT_INPUTS:
        if name not in inputs:
            continue
        value = inputs[name]
        state = inputs.get(f"state_{name}")
        if with_states and state is not None and state.shape[0]:
            if state.shape[1] != value.shape[1]:
                raise ValueError(
                    f"state_{name} has length {state.shape[1]} but {name} has {value.shape[1]}: the collator must "
                    "tokenise batch and state captions in one call"
                )
            value = torch.cat([value, state.to(value)])
        text[name] = value
    return text


def image_text_step_problems(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    index_column: str,
    with_states: bool,
    inverse_temperature: float,
    learn_logit_scale: bool,
) -> tuple[ImageTextProblems, Any]:
    """Encode the batch (and its chain states when ``with_states``), gather it from every process, build both problems.

    Args:
        model: the dual encoder (possibly wrapped by DistributedDataParallel); its ``forward`` takes
            ``pixel_values`` and text inputs and returns ``image_embeds`` and ``text_embeds``.
        inputs: the collator's batch: ``pixel_values [b, 3, H, W]``, ``input_ids`` / ``attention_mask [b, L]``,
            ``index_column [b]``, ``image_view_keys [b]``, ``caption_index [b]``; with states also
            ``state_pixel_values [k_i, 3, H, W]``, ``state_input_ids [k_t, L]``, their keys and the starts.
        index_column: the dataset-index column.
        with_states: whether the objective re-encodes chain states (EMC²).
        inverse_temperature: ``β`` when the scale is not learned.
        learn_logit_scale: use (and train) ``exp(logit_scale)``, clamped to ``[1, 100]`` first.

    Returns:
        ``(problems, model outputs)``.
    """
    pixel_values = inputs["pixel_values"]
    num_pairs = pixel_values.shape[0]
    if "input_ids" not in inputs:
        raise ValueError("an image–text batch needs input_ids (use ImageTextCollator with a tokenizer)")
    if with_states and "state_pixel_values" not in inputs:
        raise ValueError(
            "the EMC² objective needs the chain-state images and captions with every batch; the ImageTextCollator "
            "delivers them once attach_chain_states was called"
        )
    if with_states and inputs["state_pixel_values"].shape[0]:
        pixel_values = torch.cat([pixel_values, inputs["state_pixel_values"].to(pixel_values)])
    text_inputs = _concatenated_text_inputs(inputs, with_states)
    if learn_logit_scale:
        with torch.no_grad():
            logit_scale_parameter(model).clamp_(0.0, MAX_LOGIT_SCALE)
    outputs = model(pixel_values=pixel_values, **text_inputs, return_loss=False)
    image_features, text_features = outputs.image_embeds, outputs.text_embeds
    scale = logit_scale_parameter(model).exp() if learn_logit_scale else inverse_temperature

    def pairs(name: str) -> torch.Tensor | None:
        return gather_rows(inputs[name]) if name in inputs else None

    arguments: dict[str, Any] = {"image_view_keys": pairs("image_view_keys"), "caption_index": pairs("caption_index")}
    if with_states:
        arguments.update(
            text_states=(
                gather_rows(text_features[num_pairs:], differentiable=True),
                gather_rows(inputs["state_text_index"]),
                gather_rows(inputs["state_text_view"]),
            ),
            text_starts=(pairs("text_start_index"), pairs("text_start_view")),
            image_states=(
                gather_rows(image_features[num_pairs:], differentiable=True),
                gather_rows(inputs["state_image_index"]),
                gather_rows(inputs["state_image_view"]),
            ),
            image_starts=(pairs("image_start_index"), pairs("image_start_view")),
        )
    problems = image_text_problems(
        gather_rows(image_features[:num_pairs], differentiable=True),
        gather_rows(text_features[:num_pairs], differentiable=True),
        gather_rows(inputs[index_column]),
        inverse_temperature=scale,
        **arguments,
    )
    return problems, outputs
