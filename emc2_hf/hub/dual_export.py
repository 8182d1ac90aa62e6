"""Export a dual encoder (both towers, one model) with its model card."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from .model_card import ModelCardData, objective_settings, objective_title, render_model_card


def _recall(direction: str, k: int) -> tuple[str, str, str, str]:
    arrow = "Image→text" if direction == "image_to_text" else "Text→image"
    task = "Image-to-text retrieval" if direction == "image_to_text" else "Text-to-image retrieval"
    return f"{arrow} recall@{k}", task, "image-text-retrieval", "recall"


RETRIEVAL_METRICS = {
    "zero_shot_top1": (
        "Zero-shot top-1 accuracy",
        "Zero-shot classification",
        "zero-shot-image-classification",
        "accuracy",
    ),
    "zero_shot_top5": (
        "Zero-shot top-5 accuracy",
        "Zero-shot classification",
        "zero-shot-image-classification",
        "accuracy",
    ),
    "zero_shot_accuracy": (
        "Zero-shot accuracy",
        "Zero-shot classification",
        "zero-shot-image-classification",
        "accuracy",
    ),
    **{
        f"{direction}_recall@{k}": _recall(direction, k)
        for direction in ("image_to_text", "text_to_image")
        for k in (1, 5, 10)
    },
}
"""The metrics a dual encoder's card knows (the keys :class:`~emc2_hf.evaluation.DualEncoderEvaluator` returns)."""


@dataclass
class DualEncoderCardData(ModelCardData):
    """:class:`ModelCardData` plus what a dual encoder's card states about training.

    Attributes:
        objective: objective name (``"emc2"``, ``"simclr"``, ...).
        objective_config: the objective's ``get_config_dict()``.
        citations: BibTeX entries of the methods used (EMC²'s is always added).
        batch_size, steps, optimizer, learning_rate, weight_decay: the run's settings.
        metrics: ``{name: value}`` with names from :data:`RETRIEVAL_METRICS`.
        untrained_metrics: the same metrics of the model before training (shown beside them), or ``None``.
        evaluation_note: a sentence on how the metrics were measured, printed under them (e.g. that identical
            captions counted as one text).
        image_size, mean, std: the image preprocessing.
    """

    objective: str = "emc2"
    objective_config: dict[str, Any] = field(default_factory=dict)
    citations: list[str] = field(default_factory=list)
    batch_size: int | None = None
    steps: int | None = None
    optimizer: str = "adamw_torch"
    learning_rate: float | None = None
    weight_decay: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    untrained_metrics: dict[str, float] | None = None
    evaluation_note: str | None = None
    image_size: int | None = None
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


def _tower_name(model: PreTrainedModel, tower: str) -> str:
    """The tower's architecture or Hub name; a local folder is named by its model type (a card never shows a path
    of the machine it was written on)."""
    config = getattr(model.config, f"{tower}_config")
    name = getattr(config, "architecture", None) or getattr(config, "_name_or_path", None)
    if not name or os.path.isabs(name) or os.path.exists(name):
        return config.model_type
    return name


def dual_encoder_model_card(
    model: PreTrainedModel, card: DualEncoderCardData, repo_id: str, has_tokenizer: bool
) -> str:
    """Render ``model_cards/dual_encoder.md`` for ``model`` (a ``VisionTextDualEncoderModel`` or ``CLIPModel``)."""
    from .. import __version__
    from ..objectives import EMC2Objective

    unknown = sorted(set(card.metrics) - set(RETRIEVAL_METRICS))
    if unknown:
        raise ValueError(f"unknown dual-encoder metric(s) {unknown}; the card knows {sorted(RETRIEVAL_METRICS)}")
    untrained = card.untrained_metrics or {}
    metrics = [
        {
            "name": name,
            "task": task,
            "task_type": task_type,
            "type": kind,
            "value": float(card.metrics[key]),
            "untrained": None if key not in untrained else float(untrained[key]),
        }
        for key, (name, task, task_type, kind) in RETRIEVAL_METRICS.items()
        if key in card.metrics
    ]
    citations = list(dict.fromkeys([*card.citations, EMC2Objective.citation]))
    return render_model_card(
        "dual_encoder.md",
        model_name=card.model_name or repo_id.split("/")[-1],
        repo_id=repo_id,
        license=card.license,
        objective=card.objective,
        objective_title=objective_title(card.objective),
        objective_settings=objective_settings(card.objective_config),
        image_tower=_tower_name(model, "vision"),
        text_tower=_tower_name(model, "text"),
        projection_dim=model.config.projection_dim,
        architecture=type(model).__name__,
        dataset_name=card.dataset_name,
        train_split=card.train_split,
        eval_split=card.eval_split,
        batch_size=card.batch_size,
        steps=card.steps,
        optimizer=card.optimizer,
        learning_rate=card.learning_rate,
        weight_decay=card.weight_decay,
        metrics=metrics,
        has_baseline=any(metric["untrained"] is not None for metric in metrics),
        evaluation_note=card.evaluation_note,
        image_size=card.image_size,
        mean=list(card.mean),
        std=list(card.std),
        has_tokenizer=has_tokenizer,
        library_version=__version__,
        citations=citations,
    )


def export_dual_encoder(
    model: PreTrainedModel,
    output_dir: str | os.PathLike,
    card: DualEncoderCardData | None = None,
    tokenizer: Any = None,
    repo_id: str | None = None,
) -> list[str]:
    """Write ``model`` (``VisionTextDualEncoderModel`` / ``CLIPModel``: both towers and projections) as one
    safetensors folder that ``AutoModel.from_pretrained(output_dir)`` loads back, with ``tokenizer`` and a model card
    (``README.md``) when given. Returns the file names written."""
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise TypeError(
            f"export_dual_encoder needs a model with both towers (get_image_features / get_text_features), got "
            f"{type(model).__name__}; for a single image encoder use export_encoder"
        )
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    if card is not None:
        repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(dual_encoder_model_card(model, card, repo_id, has_tokenizer=tokenizer is not None))
    return sorted(os.listdir(output_dir))


def _embedding(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def dual_encoder_features(
    model: PreTrainedModel, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_features [b, p], text_features [n, p])`` in eval mode without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            image = _embedding(model.get_image_features(pixel_values=pixel_values))
            text = _embedding(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
    finally:
        model.train(was_training)
    return image, text


def push_dual_encoder(
    model: PreTrainedModel,
    repo_id: str,
    card: DualEncoderCardData | None = None,
    tokenizer: Any = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload dual encoder",
) -> Any:
    """Create ``repo_id`` if needed and upload :func:`export_dual_encoder`'s folder (weights, config, tokenizer,
    card) — never a training checkpoint. Returns ``HfApi.upload_folder``'s commit info."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        export_dual_encoder(model, folder, card=card, tokenizer=tokenizer, repo_id=repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
