"""Hub-ready exports: timm/transformers-loadable encoders and their model cards."""

from .export import PROJECTION_HEAD_NAME, export_encoder, export_features_match, load_projection_head, timm_config
from .model_card import ModelCardData, render_model_card

__all__ = [
    "PROJECTION_HEAD_NAME",
    "ModelCardData",
    "export_encoder",
    "export_features_match",
    "load_projection_head",
    "render_model_card",
    "timm_config",
]
