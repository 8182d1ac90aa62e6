"""Linear-probe and nearest-neighbour accuracy of frozen features, with all labels or a few per class."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

ArrayLike = torch.Tensor | np.ndarray | Sequence


def _numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().float().numpy()
    return np.asarray(values)


def linear_probe_accuracy(
    train_features: ArrayLike, train_labels: ArrayLike, test_features: ArrayLike, test_labels: ArrayLike
) -> float:
    """Accuracy of a multinomial logistic regression on standardised features (``[n, d]`` → labels ``[n]``)."""
    scaler = StandardScaler().fit(_numpy(train_features))
    classifier = LogisticRegression(max_iter=2000)
    classifier.fit(scaler.transform(_numpy(train_features)), _numpy(train_labels))
    predictions = classifier.predict(scaler.transform(_numpy(test_features)))
    return float((predictions == _numpy(test_labels)).mean())


def knn_accuracy(
    train_features: ArrayLike, train_labels: ArrayLike, test_features: ArrayLike, test_labels: ArrayLike, k: int = 1
) -> float:
    """Accuracy of a ``k``-nearest-neighbour vote under cosine similarity (``k = 1``: 1-NN)."""
    train = F.normalize(torch.as_tensor(_numpy(train_features), dtype=torch.float32), dim=1)
    test = F.normalize(torch.as_tensor(_numpy(test_features), dtype=torch.float32), dim=1)
    train_y = torch.as_tensor(_numpy(train_labels)).long()
    test_y = torch.as_tensor(_numpy(test_labels)).long()
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], 1024):
        neighbours = (test[start : start + 1024] @ train.t()).topk(k, dim=1).indices
        votes = train_y[neighbours]  # [t, k]
        if k == 1:
            predictions = votes[:, 0]
        else:
            counts = F.one_hot(votes, num_classes=int(train_y.max()) + 1).sum(dim=1)
            predictions = counts.argmax(dim=1)  # ties go to the smallest label
        correct += int((predictions == test_y[start : start + 1024]).sum())
    return correct / test.shape[0]


def few_shot_indices(labels: ArrayLike, shots_per_class: int, seed: int) -> np.ndarray:
    """Positions of ``shots_per_class`` examples of every class, drawn without replacement."""
    labels = _numpy(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        positions = np.flatnonzero(labels == label)
        if len(positions) < shots_per_class:
            raise ValueError(
                f"class {label} has {len(positions)} labelled examples, fewer than shots_per_class={shots_per_class}"
            )
        picked.append(rng.choice(positions, size=shots_per_class, replace=False))
    return np.sort(np.concatenate(picked))


def few_shot_accuracies(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    shots_per_class: int = 5,
    num_draws: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """Linear probe and 1-NN fitted on ``shots_per_class`` labels per class, averaged over ``num_draws`` draws."""
    train_features, train_labels = _numpy(train_features), _numpy(train_labels)
    linear, nearest = [], []
    for draw in range(num_draws):
        subset = few_shot_indices(train_labels, shots_per_class, seed + draw)
        linear.append(linear_probe_accuracy(train_features[subset], train_labels[subset], test_features, test_labels))
        nearest.append(knn_accuracy(train_features[subset], train_labels[subset], test_features, test_labels))
    return {"fewshot_linear_probe_accuracy": float(np.mean(linear)), "fewshot_knn_accuracy": float(np.mean(nearest))}


def probe_metrics(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    shots_per_class: int = 5,
    num_draws: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """``linear_probe_accuracy``, ``knn_accuracy`` (1-NN) and their few-shot versions, as fractions."""
    return {
        "linear_probe_accuracy": linear_probe_accuracy(train_features, train_labels, test_features, test_labels),
        "knn_accuracy": knn_accuracy(train_features, train_labels, test_features, test_labels),
        **few_shot_accuracies(
            train_features, train_labels, test_features, test_labels, shots_per_class, num_draws, seed
        ),
    }


def _column_names(dataset: Any) -> list[str]:
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    return sorted(dataset[0]) if len(dataset) else []


def _column(dataset: Any, start: int, stop: int, column: str) -> list:
    if hasattr(dataset, "column_names"):
        return dataset[start:stop][column]
    return [dataset[i][column] for i in range(start, stop)]


def extract_features(
    model: torch.nn.Module,
    pixel_values_fn: Callable[[list], torch.Tensor],
    dataset: Any,
    image_column: str = "image",
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Backbone features ``FloatTensor[n, d]`` (CPU) of every row, computed without gradients in eval mode.

    ``pixel_values_fn`` turns a batch of raw image values into ``[b, 3, H, W]`` (e.g. ``collator.eval_pixel_values``);
    the model is called as ``model(pixel_values=...)`` and must return ``.features``.
    """
    if image_column not in _column_names(dataset):
        raise ValueError(
            f"no column {image_column!r} in the evaluation data; its columns are {_column_names(dataset)}"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                images = _column(dataset, start, min(start + batch_size, len(dataset)), image_column)
                pixel_values = pixel_values_fn(images).to(device)
                chunks.append(model(pixel_values=pixel_values).features.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


@dataclass
class ProbeEvaluator:
    """Probe accuracies of a model's backbone features: fit on ``train_dataset``, measure on ``test_dataset``.

    ``__call__(model)`` returns :func:`probe_metrics`' four accuracies.
    """

    train_dataset: Any
    test_dataset: Any
    pixel_values_fn: Callable[[list], torch.Tensor]
    image_column: str = "image"
    label_column: str = "label"
    shots_per_class: int = 5
    num_draws: int = 10
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name, dataset in (("train_dataset", self.train_dataset), ("test_dataset", self.test_dataset)):
            columns = _column_names(dataset)
            for column in (self.image_column, self.label_column):
                if column not in columns:
                    raise ValueError(
                        f"ProbeEvaluator: {name} has no column {column!r}; its columns are {columns} "
                        "(set image_column / label_column, recipes: --image_column / --label_column)"
                    )

    def __call__(self, model: torch.nn.Module, device: torch.device | str | None = None) -> dict[str, float]:
        features = {
            name: extract_features(model, self.pixel_values_fn, dataset, self.image_column, self.batch_size, device)
            for name, dataset in (("train", self.train_dataset), ("test", self.test_dataset))
        }
        return probe_metrics(
            features["train"],
            _labels(self.train_dataset, self.label_column),
            features["test"],
            _labels(self.test_dataset, self.label_column),
            self.shots_per_class,
            self.num_draws,
            self.seed,
        )


def _labels(dataset: Any, column: str) -> np.ndarray:
    if hasattr(dataset, "column_names"):
        return np.asarray(dataset[column])
    return np.asarray([row[column] for row in dataset])
