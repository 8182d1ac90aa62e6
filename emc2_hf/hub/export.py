"""Export a trained encoder's backbone so that timm and transformers both load it, with identical features.

The folder holds ``config.json`` in timm's format, ``model.safetensors`` with timm's parameter names, and (optionally)
``projection_head.safetensors``. ``timm.create_model("local-dir:DIR", pretrained=True)`` and
``transformers.AutoModel.from_pretrained(DIR)`` (a ``TimmWrapperModel``) both read it.

Neither library's own writer gives such a folder for a headless (``num_classes=0``) backbone: timm's ``save_for_hf``
records ``num_classes`` inside ``model_args``, which transformers then passes twice ("got multiple values for keyword
argument 'num_classes'"), and ``TimmWrapperModel.save_pretrained`` prefixes every weight with ``timm_model.``, which
timm's loader does not strip. Here ``num_classes = 0`` appears only at the config's top level (timm makes it the
model's default) and the weights keep timm's names (transformers adds its prefix when loading).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..modeling.encoder import ContrastiveEncoder, projection_head

PROJECTION_HEAD_NAME = "projection_head.safetensors"
# Options that shape the network must travel with it; these only steer initialisation or the classifier.
_NOT_EXPORTED_ARGS = {"num_classes", "zero_init_last", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay"}


def timm_config(
    model: ContrastiveEncoder,
    image_size: int,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
) -> dict[str, Any]:
    """timm's ``config.json`` for ``model``'s headless backbone, trained at ``image_size`` with ``mean``/``std``."""
    backbone = model.backbone
    source_cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    model_args = {k: v for k, v in (model.config.backbone_kwargs or {}).items() if k not in _NOT_EXPORTED_ARGS}
    pretrained_cfg = {
        "input_size": [3, image_size, image_size],
        "fixed_input_size": bool(source_cfg.get("fixed_input_size", False)),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(mean),
        "std": list(std),
        "num_classes": 0,
    }
    for key in ("first_conv", "classifier", "pool_size"):
        if key in source_cfg:
            pretrained_cfg[key] = source_cfg[key]
    return {
        "architecture": model.config.backbone.split(".")[0],
        "num_classes": 0,
        "num_features": int(backbone.num_features),
        "global_pool": getattr(backbone, "global_pool_type", None) or _global_pool(backbone),
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


def _global_pool(backbone: nn.Module) -> str:
    pool = getattr(backbone, "global_pool", None)
    pool_type = getattr(pool, "pool_type", None)
    return pool_type if isinstance(pool_type, str) and pool_type else "avg"


def export_encoder(
    model: ContrastiveEncoder,
    output_dir: str | os.PathLike,
    image_size: int,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
    include_projection_head: bool = False,
    model_card: str | None = None,
) -> list[str]:
    """Write ``model``'s backbone (and optionally its projection head and a model card) to ``output_dir``.

    Returns the written file names. Features: ``timm_model(x) == model(pixel_values=x).features``.
    """
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.json"), "w") as handle:
        json.dump(timm_config(model, image_size, mean, std), handle, indent=2)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.backbone.state_dict().items()}
    save_file(weights, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
    written = ["config.json", "model.safetensors"]
    if include_projection_head:
        head = {name: t.detach().cpu().contiguous() for name, t in model.projection.state_dict().items()}
        metadata = {
            "format": "pt",
            "feature_dim": str(model.config.feature_dim),
            "projection_dim": str(model.config.projection_dim),
            "projection_hidden_dim": str(model.config.projection_hidden_dim or model.config.feature_dim),
            "projection_batch_norm": str(bool(model.config.projection_batch_norm)),
        }
        save_file(head, os.path.join(output_dir, PROJECTION_HEAD_NAME), metadata=metadata)
        written.append(PROJECTION_HEAD_NAME)
    if model_card is not None:
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(model_card)
        written.append("README.md")
    return written


def load_projection_head(export_dir: str | os.PathLike) -> nn.Module:
    """The projection head saved by ``export_encoder(..., include_projection_head=True)``: features → embeddings."""
    path = os.path.join(export_dir, PROJECTION_HEAD_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: export with include_projection_head=True to ship the head")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    head = projection_head(
        int(metadata["feature_dim"]),
        int(metadata["projection_hidden_dim"]),
        int(metadata["projection_dim"]),
        metadata.get("projection_batch_norm", "True") == "True",
    )
    head.load_state_dict(load_file(path))
    return head.eval()


def export_features_match(model: ContrastiveEncoder, export_dir: str, pixel_values: torch.Tensor) -> float:
    """Largest absolute difference between the trained model's features and the timm-loaded export's."""
    import timm

    exported = timm.create_model(f"local-dir:{os.path.abspath(export_dir)}", pretrained=True).eval()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        difference = (exported(pixel_values) - model(pixel_values=pixel_values).features).abs().max().item()
    model.train(was_training)
    return difference
