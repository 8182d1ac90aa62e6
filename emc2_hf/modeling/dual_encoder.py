"""CLIP-style dual encoders: an image tower and a text tower as one transformers model.

The model is transformers' :class:`~transformers.VisionTextDualEncoderModel` (or a :class:`~transformers.CLIPModel`),
so ``save_pretrained`` writes one folder of safetensors weights that ``AutoModel.from_pretrained`` loads back as one
model with ``get_image_features`` and ``get_text_features``. A timm image tower (e.g. a backbone pre-trained with
:class:`~emc2_hf.ContrastiveTrainer`) enters as transformers' ``TimmWrapperModel``.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel, VisionTextDualEncoderModel

from .encoder import ContrastiveEncoder


def timm_image_tower(
    encoder: ContrastiveEncoder,
    image_size: int,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
) -> PreTrainedModel:
    """``encoder``'s backbone as a transformers ``TimmWrapperModel`` whose ``pooler_output`` equals
    ``encoder(pixel_values=x).features`` (``[b, feature_dim]``); its config also carries ``hidden_size`` so that
    ``VisionTextDualEncoderModel`` can size the visual projection."""
    from ..hub.export import export_encoder

    with tempfile.TemporaryDirectory() as folder:
        export_encoder(encoder, folder, image_size=image_size, mean=mean, std=std)
        tower = AutoModel.from_pretrained(folder)
    tower.config.hidden_size = int(tower.timm_model.num_features)
    return tower


def build_dual_encoder(
    image_tower: PreTrainedModel,
    text_tower: PreTrainedModel,
    projection_dim: int = 512,
    logit_scale_init_value: float = 2.6592,
) -> VisionTextDualEncoderModel:
    """Join two pre-trained towers with new linear projections (``Linear(hidden, projection_dim, bias=False)``) and
    a learnable logit scale, as CLIP: ``logits = exp(logit_scale) · normalise(W_i f_i) · normalise(W_t f_t)ᵀ``.

    ``image_tower``: a transformers vision model returning ``pooler_output`` (``TimmWrapperModel`` from
    :func:`timm_image_tower`, ``CLIPVisionModel``, ``ViTModel``, ...). ``text_tower``: a transformers text encoder
    (``BertModel``, the MiniLM of sentence-transformers, ``CLIPTextModel``, ...).
    """
    if not hasattr(image_tower.config, "hidden_size"):
        raise ValueError(
            f"the image tower's config ({type(image_tower.config).__name__}) has no hidden_size; for a timm backbone "
            "use timm_image_tower(...), which sets it"
        )
    model = VisionTextDualEncoderModel(vision_model=image_tower, text_model=text_tower)
    if model.config.projection_dim != projection_dim:
        model.config.projection_dim = projection_dim
        model.projection_dim = projection_dim
        model.visual_projection = torch.nn.Linear(model.vision_embed_dim, projection_dim, bias=False)
        model.text_projection = torch.nn.Linear(model.text_embed_dim, projection_dim, bias=False)
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale_init_value)
    model.config.logit_scale_init_value = logit_scale_init_value
    return model


def _features(output: Any) -> torch.Tensor:
    """A tower's features: ``get_*_features`` returns a tensor in older transformers, a model output in newer ones."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot read features from {type(output).__name__}; expected a tensor or a pooler_output")


def encode_images(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``FloatTensor[b, p]``: the projected, **unnormalised** image features ``model.get_image_features(...)`` of a
    dual encoder (``VisionTextDualEncoderModel``, ``CLIPModel``, or anything with that method), with autograd."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return _features(model.get_image_features(pixel_values=pixel_values))


def encode_texts(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **text_inputs: torch.Tensor
) -> torch.Tensor:
    """``FloatTensor[n, p]``: the projected, **unnormalised** text features ``model.get_text_features(...)``."""
    model = getattr(model, "module", model)
    return _features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **text_inputs))


def _keep_in_eval_mode(module: nn.Module) -> None:
    """Make ``module.train(...)`` a no-op that keeps eval mode (BatchNorm statistics and dropout stay fixed)."""

    def train(mode: bool = True) -> nn.Module:
        return nn.Module.train(module, False)

    module.train = train  # type: ignore[method-assign]
    module.eval()


def freeze_towers(model: nn.Module, image: bool = False, text: bool = False) -> dict[str, int]:
    """Freeze the image and/or text tower of a dual encoder (``vision_model`` / ``text_model`` of a
    ``VisionTextDualEncoderModel`` or ``CLIPModel``): no gradients, and eval mode for good (the Trainer's
    ``model.train()`` leaves a frozen tower's BatchNorm statistics and dropout alone). The projections and the logit
    scale stay trainable (LiT: a locked image tower, a tuned text tower).

    Returns:
        ``{"frozen_parameters": n, "trainable_parameters": n}``.
    """
    for flag, name in ((image, "vision_model"), (text, "text_model")):
        if not flag:
            continue
        tower = getattr(model, name, None)
        if not isinstance(tower, nn.Module):
            raise ValueError(
                f"cannot freeze the {'image' if name == 'vision_model' else 'text'} tower: {type(model).__name__} has "
                f"no '{name}' (expected a VisionTextDualEncoderModel or CLIPModel)"
            )
        tower.requires_grad_(False)
        _keep_in_eval_mode(tower)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"frozen_parameters": frozen, "trainable_parameters": trainable}
