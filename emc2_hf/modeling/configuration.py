"""Configuration of :class:`~emc2_hf.modeling.ContrastiveEncoder`."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


class ContrastiveEncoderConfig(PreTrainedConfig):
    r"""
    A timm backbone followed by a projection head.

    Args:
        backbone (`str`, defaults to `"resnet18"`):
            Name of the timm architecture (`timm.list_models()`), created with `num_classes=0` so it returns pooled
            features.
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (e.g. `{"drop_path_rate": 0.1}`).
        pretrained_backbone (`bool`, defaults to `False`):
            Whether to load timm's pretrained weights when the encoder is first built (needs the weights to be
            downloadable or cached). Never used when loading with `from_pretrained`, which restores saved weights.
        projection_dim (`int` or `None`, defaults to 128):
            Output size of the projection head; `None` means no head (embeddings are the backbone features).
        projection_hidden_dim (`int` or `None`, *optional*):
            Hidden size of the two-layer MLP head (SimCLR's); defaults to the backbone's feature size.
        projection_batch_norm (`bool`, defaults to `True`):
            BatchNorm after the head's hidden layer (SimCLR). `False`: `Linear → ReLU → Linear`, as the EMC² reference
            code; with a backbone without batch statistics too (`backbone_kwargs={"norm_layer": "groupnorm"}`) an
            image's embedding does not depend on its batch, so N processes × b/N train exactly like 1 × b.
        zero_init_residual (`bool`, defaults to `False`):
            Keep timm's zero initialisation of the last normalisation layer of every residual block. It is a
            supervised-training trick; from scratch at small resolutions it makes an untrained ResNet-18's features
            depend on one corner pixel (1-NN on digits at 32 px: 15% with it, 96% without). Ignored by backbones
            without
            that option.
        feature_dim (`int`, *optional*):
            Size of the backbone's features; filled in when the model is built.
    """

    model_type = "emc2_contrastive_encoder"

    backbone: str = "resnet18"
    backbone_kwargs: dict[str, Any] | None = None
    pretrained_backbone: bool = False
    projection_dim: int | None = 128
    projection_hidden_dim: int | None = None
    projection_batch_norm: bool = True
    zero_init_residual: bool = False
    feature_dim: int | None = None
