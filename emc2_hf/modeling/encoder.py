"""A timm backbone plus a projection head, as a transformers ``PreTrainedModel``."""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration import ContrastiveEncoderConfig


@dataclass
class ContrastiveEncoderOutput(ModelOutput):
    """
    Args:
        embeddings (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            Projected features, what the contrastive objective compares.
        features (`torch.FloatTensor` of shape `(batch_size, feature_dim)`):
            Pooled backbone features, what evaluation (linear probe, 1-NN) uses.
    """

    embeddings: torch.FloatTensor | None = None
    features: torch.FloatTensor | None = None


def projection_head(
    feature_dim: int, hidden_dim: int | None, projection_dim: int | None, batch_norm: bool = True
) -> nn.Module:
    """SimCLR's head ``Linear(d, h) → BatchNorm → ReLU → Linear(h, p)``; identity when ``projection_dim`` is None.

    ``batch_norm=False`` gives ``Linear(d, h) → ReLU → Linear(h, p)`` (with a bias on the first layer), as in the EMC²
    reference code: no batch statistics, so an embedding does not depend on the rest of the batch.
    """
    if projection_dim is None:
        return nn.Identity()
    hidden_dim = hidden_dim or feature_dim
    if not batch_norm:
        return nn.Sequential(
            nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, projection_dim)
        )
    return nn.Sequential(
        nn.Linear(feature_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, projection_dim),
    )


def create_backbone(config: ContrastiveEncoderConfig) -> nn.Module:
    """``timm.create_model(config.backbone, num_classes=0, ...)`` with a clear error for an unknown name."""
    if config.backbone not in timm.list_models() and config.backbone.split(".")[0] not in timm.list_models():
        raise ValueError(
            f"unknown timm backbone {config.backbone!r}; see timm.list_models() (e.g. 'resnet18', 'resnet50')"
        )
    kwargs = dict(config.backbone_kwargs or {})
    if not config.zero_init_residual and "zero_init_last" not in kwargs:
        try:
            return timm.create_model(
                config.backbone, pretrained=config.pretrained_backbone, num_classes=0, zero_init_last=False, **kwargs
            )
        except TypeError as error:  # a backbone without residual zero-init
            if "zero_init_last" not in str(error):
                raise
    return timm.create_model(config.backbone, pretrained=config.pretrained_backbone, num_classes=0, **kwargs)


class ContrastiveEncoder(PreTrainedModel):
    """Image encoder for contrastive pre-training: ``features = backbone(x)``, ``embeddings = head(features)``.

    ``save_pretrained`` / ``from_pretrained`` round-trip config and weights (safetensors). The backbone is any timm
    model,
    built with ``pretrained=False`` unless ``config.pretrained_backbone`` asks otherwise.

    Example:

    ```python
    >>> from emc2_hf import ContrastiveEncoder, ContrastiveEncoderConfig
    >>> model = ContrastiveEncoder(ContrastiveEncoderConfig(backbone="resnet18", projection_dim=128))
    >>> out = model(pixel_values=torch.randn(4, 3, 32, 32))
    >>> out.embeddings.shape, out.features.shape
    (torch.Size([4, 128]), torch.Size([4, 512]))
    ```
    """

    config_class = ContrastiveEncoderConfig
    config: ContrastiveEncoderConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # The Trainer then scales the loss for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: ContrastiveEncoderConfig) -> None:
        super().__init__(config)
        self.backbone = create_backbone(config)
        config.feature_dim = self.backbone.num_features
        self.projection = projection_head(
            config.feature_dim, config.projection_hidden_dim, config.projection_dim, config.projection_batch_norm
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # timm and torch initialise every layer when it is built; from_pretrained loads every weight. Nothing to do.
        pass

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> ContrastiveEncoderOutput:
        """``pixel_values: [n, 3, H, W]`` → embeddings ``[n, projection_dim]`` and features ``[n, feature_dim]``."""
        features = self.backbone(pixel_values)
        return ContrastiveEncoderOutput(embeddings=self.projection(features), features=features)
