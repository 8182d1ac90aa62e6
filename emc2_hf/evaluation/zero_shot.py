"""Zero-shot classification with a dual encoder (CLIP-style): classify images by their nearest class prompt.

Each class ``k`` is described by ``T`` prompts (``"a photo of a {}."`` filled with its name); CLIP's prompt ensembling
(Radford et al., 2021, Sec. 3.1.4) makes its classifier row ``w_k = normalise(mean_j normalise(f_text(prompt_kj)))``
and an image ``x`` is assigned ``argmax_k cos(f_image(x), w_k)``. Ties are broken by class index, the smaller first
(the rule of :mod:`emc2_hf.evaluation.retrieval`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .probes import _labels
from .retrieval import (
    _check_ks,
    check_columns,
    encode_image_column,
    encode_text_list,
    evaluating,
    model_device,
    normalised,
    normalised_pair,
    rank_of_first_positive,
)


def zero_shot_classifier(class_text_embeddings: torch.Tensor) -> torch.Tensor:
    """``[K, d]``: CLIP's prompt ensemble of ``class_text_embeddings`` (``[K, T, d]``, ``T`` prompts per class).

    Every prompt embedding is L2-normalised, the ``T`` of a class averaged, and the mean L2-normalised again, so
    rescaling any prompt's embedding changes nothing. Returned in at least float32.
    """
    if class_text_embeddings.ndim != 3 or 0 in class_text_embeddings.shape:
        raise ValueError(
            f"class_text_embeddings must be [K, T, d] with K, T, d > 0, got {class_text_embeddings.shape}"
        )
    return normalised(normalised(class_text_embeddings).mean(dim=1))


def zero_shot_accuracy(
    image_embeddings: torch.Tensor,
    classifier: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    top_k: Sequence[int] = (1, 5),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Top-k accuracy of classifying ``image_embeddings`` by cosine similarity to the rows of ``classifier``.

    Args:
        image_embeddings: ``[n, d]`` (any float dtype; L2-normalised here).
        classifier: ``[K, d]``, one row per class, e.g. :func:`zero_shot_classifier`'s (normalised again here).
        labels: ``int[n]``, each image's class, in ``[0, K)``.
        top_k: the cut-offs. A ``k >= K`` is clipped to ``K``, so it scores 1 (every class is in the "top k").
        chunk_size: images scored at once (memory ``chunk_size × K``); the result does not depend on it.

    Returns:
        ``{"zero_shot_top{k}": fraction of images whose class is among their k most similar classes}`` for every ``k``
        in ``top_k`` (default keys ``zero_shot_top1`` and ``zero_shot_top5``), each in ``[0, 1]``. Ties go to the
        smaller class index.
    """
    top_k = _check_ks(top_k, "top_k")
    images, classes = normalised_pair(image_embeddings, classifier, "image_embeddings [n, d]", "classifier [K, d]")
    labels = torch.as_tensor(labels, device=images.device).long()
    num_classes = classes.shape[0]
    if labels.shape != (images.shape[0],) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must hold one class in [0, {num_classes}) per image ({images.shape[0]})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    class_index = torch.arange(num_classes, device=images.device)
    ranks = torch.cat(
        [
            rank_of_first_positive(
                images[start : start + chunk_size] @ classes.T,  # [b, K]
                class_index[None, :] == labels[start : start + chunk_size, None],  # [b, K]: one-hot labels
            )
            for start in range(0, images.shape[0], chunk_size)
        ]
    )
    return {f"zero_shot_top{k}": float((ranks < min(k, num_classes)).double().mean()) for k in top_k}


def _is_template(template: Any) -> bool:
    """Whether ``template.format(name)`` puts ``name`` in its one ``"{}"``."""
    if not isinstance(template, str) or "{}" not in template:
        return False
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return False
    return True


def check_prompts(class_names: Sequence[str], templates: Sequence[str]) -> None:
    """Raise a one-line ``ValueError`` unless there are class names and templates, each name a non-empty string
    and each template a format string with exactly one ``"{}"`` (where the class name goes)."""
    if isinstance(class_names, str) or not class_names:
        raise ValueError(f"ZeroShotEvaluator: class_names must be a non-empty list of strings, got {class_names!r}")
    for position, name in enumerate(class_names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(
                f"ZeroShotEvaluator: class name {position} is {name!r}; every class needs a non-empty name"
            )
    if isinstance(templates, str) or not templates:
        raise ValueError(
            f"ZeroShotEvaluator: templates must be a non-empty list of strings like 'a photo of a {{}}.', "
            f"got {templates!r}"
        )
    for template in templates:
        if not _is_template(template):
            raise ValueError(
                f"ZeroShotEvaluator: template {template!r} needs exactly one '{{}}' where the class name goes, e.g. "
                "'a photo of a {}.' (write literal braces as '{{' and '}}')"
            )


@dataclass
class ZeroShotEvaluator:
    """Zero-shot top-1 / top-5 accuracy of a dual encoder on a labelled image dataset.

    ``__call__(model, device=None)`` encodes every ``template.format(class_name)`` (``K × T`` prompts) with
    :func:`~emc2_hf.modeling.encode_texts`, builds :func:`zero_shot_classifier`, encodes every image with
    :func:`~emc2_hf.modeling.encode_images`, all in eval mode without gradients (the model's train/eval mode is
    restored), and returns :func:`zero_shot_accuracy`: ``zero_shot_top1`` and ``zero_shot_top5``.

    Args:
        dataset: a ``datasets.Dataset`` or a sequence of dict rows.
        class_names: the name of class ``k`` at position ``k`` (``dataset.features["label"].names`` for a
            ``ClassLabel``), each non-empty.
        templates: the prompts, each with one ``"{}"`` for the class name (CLIP's 80 ImageNet templates, or just
            ``["a photo of a {}."]``).
        tokenizer: the text tower's tokenizer (called with ``padding``, ``truncation``, ``max_length``).
        image_transform: ``PIL.Image`` (RGB) → ``FloatTensor[3, H, W]``, the eval preprocessing of the image tower.
        image_column, label_column: the columns holding the images and the integer labels in ``[0, K)``; checked,
            with the names, templates and labels, at construction.
        batch_size: images or prompts encoded per forward pass.
        max_length: prompts are truncated to this many tokens (77 for CLIP).
        top_k: the accuracy cut-offs (clipped to ``K``).
        name: what ``dataset`` is, for error messages.
    """

    dataset: Any
    class_names: list[str]
    templates: list[str]
    tokenizer: Any
    image_transform: Callable[[Image.Image], torch.Tensor]
    image_column: str = "image"
    label_column: str = "label"
    batch_size: int = 64
    max_length: int = 77
    top_k: Sequence[int] = (1, 5)
    name: str = "the zero-shot evaluation set"
    labels: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_prompts(self.class_names, self.templates)
        check_columns(
            self.dataset,
            {"image_column": self.image_column, "label_column": self.label_column},
            "ZeroShotEvaluator: dataset",
        )
        self.top_k = _check_ks(self.top_k, "top_k")
        self.labels = _labels(self.dataset, self.label_column)
        if self.labels.ndim != 1 or not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(
                f"ZeroShotEvaluator: column {self.label_column!r} holds {self.labels.dtype} values of shape "
                f"{self.labels.shape}; it needs one integer class index per row"
            )
        outside = np.flatnonzero((self.labels < 0) | (self.labels >= len(self.class_names)))
        if len(outside):
            row = int(outside[0])
            raise ValueError(
                f"ZeroShotEvaluator: row {row} of column {self.label_column!r} has label {self.labels[row].item()!r}; "
                f"labels must be integers in [0, {len(self.class_names)}), one per class name"
            )

    @property
    def prompts(self) -> list[str]:
        """The ``K × T`` prompts, class by class: ``templates[j].format(class_names[k])`` at ``k * T + j``."""
        return [template.format(name) for name in self.class_names for template in self.templates]

    def __call__(self, model: torch.nn.Module, device: torch.device | str | None = None) -> dict[str, float]:
        """``{"zero_shot_top{k}"}`` for every ``k`` in ``top_k`` (default ``zero_shot_top1``, ``zero_shot_top5``)."""
        device = model_device(model, device)
        with evaluating(model):
            prompts = encode_text_list(model, self.tokenizer, self.prompts, self.batch_size, self.max_length, device)
            images = encode_image_column(
                model, self.dataset, self.image_transform, self.image_column, self.batch_size, device, self.name
            )
        classifier = zero_shot_classifier(prompts.reshape(len(self.class_names), len(self.templates), -1))
        return zero_shot_accuracy(images, classifier, torch.as_tensor(self.labels), self.top_k)
