"""Encoders: a timm backbone with a projection head as a transformers model."""

from .configuration import ContrastiveEncoderConfig
from .dual_encoder import build_dual_encoder, encode_images, encode_texts, freeze_towers, timm_image_tower
from .encoder import ContrastiveEncoder, ContrastiveEncoderOutput, projection_head

__all__ = [
    "ContrastiveEncoder",
    "ContrastiveEncoderConfig",
    "ContrastiveEncoderOutput",
    "build_dual_encoder",
    "encode_images",
    "encode_texts",
    "freeze_towers",
    "projection_head",
    "timm_image_tower",
]
