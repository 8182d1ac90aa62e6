"""Encoders: a timm backbone with a projection head as a transformers model."""

from .configuration import ContrastiveEncoderConfig
from .encoder import ContrastiveEncoder, ContrastiveEncoderOutput, projection_head

__all__ = ["ContrastiveEncoder", "ContrastiveEncoderConfig", "ContrastiveEncoderOutput", "projection_head"]
