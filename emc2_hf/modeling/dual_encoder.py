"""CLIP-style dual encoders: an image tower and a text tower as one transformers model.

The model is transformers' :class:`~transformers.VisionTextDualEncoderModel` (or a :class:`~transformers.CLIPModel`),
so ``save_pretrained`` writes one folder of safetensors weights that ``AutoModel.from_pretrained`` loads back as one
model with ``get_image_features`` and ``get_text_features``. A timm image tower (e.g. a backbone pre-trained with
:class:`~emc2_hf.ContrastiveTrainer`) enters as transformers' ``TimmWrapperModel``.
"""

from __future__ import annotations

import tempfile

import torch
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
