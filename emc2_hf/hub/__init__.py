"""Hub-ready exports: timm/transformers-loadable encoders and their model cards."""

from .dual_export import DualEncoderCardData, dual_encoder_features, export_dual_encoder, push_dual_encoder
from .export import PROJECTION_HEAD_NAME, export_encoder, export_features_match, load_projection_head, timm_config
from .model_card import ModelCardData, render_model_card

__all__ = [
    "DualEncoderCardData",
    "dual_encoder_features",
    "export_dual_encoder",
    "push_dual_encoder",
    "PROJECTION_HEAD_NAME",
    "ModelCardData",
    "export_encoder",
    "export_features_match",
    "load_projection_head",
    "render_model_card",
    "timm_config",
]
