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

from ..data.images import decode_image

ArrayLike = torch.Tensor | np.ndarray | Sequence


def _numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return (values.float() if values.is_floating_point() else values).numpy()
    return np.asarray(values)


def _features_and_labels(features: ArrayLike, labels: ArrayLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``([n, d] features, [n] labels)`` as arrays, with a clear error on a shape mismatch."""
    features, labels = _numpy(features), _numpy(labels)
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"{split} features must be [n, d] and labels [n] with n > 0, got {features.shape} and {labels.shape}"
        )
    return features, labels


def linear_probe_accuracy(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    C: float = 1.0,
) -> float:
    """Accuracy of a multinomial logistic regression on standardised features.

    Args:
        train_features, train_labels: ``[n, d]`` and ``[n]``, what the scaler and the classifier are fitted on.
        test_features, test_labels: ``[t, d]`` and ``[t]``, what the accuracy is measured on.
        C: inverse L2 regularisation strength (scikit-learn's ``C``).

    Returns:
        The fraction of test examples classified correctly, in ``[0, 1]``.
    """
    train_x, train_y = _features_and_labels(train_features, train_labels, "train")
    test_x, test_y = _features_and_labels(test_features, test_labels, "test")
    scaler = StandardScaler().fit(train_x)
    # lbfgs fits the multinomial (softmax) model; standardised 512-d features of ~1k examples converge in < 100 steps.
    classifier = LogisticRegression(C=C, max_iter=5000).fit(scaler.transform(train_x), train_y)
    return float((classifier.predict(scaler.transform(test_x)) == test_y).mean())


def knn_accuracy(
    train_features: ArrayLike, train_labels: ArrayLike, test_features: ArrayLike, test_labels: ArrayLike, k: int = 1
) -> float:
    """Accuracy of a ``k``-nearest-neighbour majority vote under cosine similarity (``k = 1``: 1-NN).

    Features (``[n, d]`` train, ``[t, d]`` test) are L2-normalised, so rescaling any row changes nothing. A tied vote
    goes to the tied class whose member ranks nearest.
    """
    train_x, train_y = _features_and_labels(train_features, train_labels, "train")
    test_x, test_y = _features_and_labels(test_features, test_labels, "test")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    classes, train_codes = np.unique(train_y, return_inverse=True)
    train = F.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    test = F.normalize(torch.as_tensor(test_x, dtype=torch.float32), dim=1)
    codes = torch.as_tensor(train_codes.reshape(-1), dtype=torch.long)
    k = min(k, train.shape[0])
    predictions = []
    for start in range(0, test.shape[0], 1024):
        neighbours = (test[start : start + 1024] @ train.t()).topk(k, dim=1).indices  # [b, k], nearest first
        votes = codes[neighbours]  # [b, k]
        counts = torch.zeros(votes.shape[0], len(classes), dtype=torch.long).scatter_add_(
            1, votes, torch.ones_like(votes)
        )
        ranks = torch.arange(k).expand_as(votes)
        first = torch.full_like(counts, k).scatter_reduce_(1, votes, ranks, reduce="amin")  # rank of nearest member
        predictions.append((counts * (k + 1) + (k - first)).argmax(dim=1))  # more votes first, then nearer
    predicted = classes[torch.cat(predictions).numpy()]
    return float((predicted == test_y).mean())


def few_shot_indices(labels: ArrayLike, shots_per_class: int, seed: int) -> np.ndarray:
    """Sorted positions (``int64[shots_per_class * num_classes]``) of ``shots_per_class`` examples of every class.

    Drawn without replacement, deterministically given ``seed``. Raises ``ValueError`` naming any class with fewer
    than ``shots_per_class`` examples.
    """
    labels = _numpy(labels).reshape(-1)
    if shots_per_class < 1:
        raise ValueError(f"shots_per_class must be >= 1, got {shots_per_class}")
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
    """Linear probe and 1-NN fitted on ``shots_per_class`` labels per class, averaged over ``num_draws`` draws.

    Draw ``i`` uses :func:`few_shot_indices` with seed ``seed + i``; the whole test split is always measured.

    Returns:
        ``{"fewshot_linear_probe_accuracy": float, "fewshot_knn_accuracy": float}``, fractions in ``[0, 1]``.
    """
    train_x, train_y = _features_and_labels(train_features, train_labels, "train")
    test_x, test_y = _features_and_labels(test_features, test_labels, "test")
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")
    linear, nearest = [], []
    for draw in range(num_draws):
        subset = few_shot_indices(train_y, shots_per_class, seed + draw)
        linear.append(linear_probe_accuracy(train_x[subset], train_y[subset], test_x, test_y))
        nearest.append(knn_accuracy(train_x[subset], train_y[subset], test_x, test_y))
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
    """All four probes of ``[n, d]`` train / ``[t, d]`` test features, as fractions in ``[0, 1]``.

    Returns:
        ``linear_probe_accuracy`` and ``knn_accuracy`` (1-NN) fitted on every train label, and
        ``fewshot_linear_probe_accuracy`` and ``fewshot_knn_accuracy`` (see :func:`few_shot_accuracies`).
    """
    train_x, train_y = _features_and_labels(train_features, train_labels, "train")
    test_x, test_y = _features_and_labels(test_features, test_labels, "test")
    return {
        "linear_probe_accuracy": linear_probe_accuracy(train_x, train_y, test_x, test_y),
        "knn_accuracy": knn_accuracy(train_x, train_y, test_x, test_y),
        **few_shot_accuracies(train_x, train_y, test_x, test_y, shots_per_class, num_draws, seed),
    }


def _column_names(dataset: Any) -> list[str]:
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    return sorted(dataset[0]) if len(dataset) else []


def _check_column(dataset: Any, column: str, where: str) -> None:
    if column not in _column_names(dataset):
        raise ValueError(f"{where} has no column {column!r}; its columns are {_column_names(dataset)}")


def _column(dataset: Any, start: int, stop: int, column: str) -> list:
    """Values of ``column`` in rows ``start:stop``: one slice of a ``datasets.Dataset``, else row by row."""
    if hasattr(dataset, "column_names"):
        return dataset[start:stop][column]
    return [dataset[i][column] for i in range(start, stop)]


def _undecoded(dataset: Any, column: str) -> Any:
    """``dataset`` with an ``Image`` column left undecoded, so :func:`decode_image` decodes it and can name the file
    of an image that fails (``datasets`` would raise PIL's error naming nothing)."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _labels(dataset: Any, column: str) -> np.ndarray:
    if hasattr(dataset, "column_names"):
        return np.asarray(dataset[column])
    return np.asarray([row[column] for row in dataset])


def extract_features(
    model: torch.nn.Module,
    pixel_values_fn: Callable[[list], torch.Tensor],
    dataset: Any,
    image_column: str = "image",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    source: str = "the evaluation data",
) -> torch.Tensor:
    """Backbone features of every row of ``dataset``, computed in eval mode without gradients.

    Args:
        model: called as ``model(pixel_values=FloatTensor[b, 3, H, W])``; its output's ``.features`` (``[b, d]``) is
            kept. Its train/eval mode is restored afterwards.
        pixel_values_fn: turns a batch's raw ``image_column`` values into ``FloatTensor[b, 3, H, W]``
            (e.g. ``collator.eval_pixel_values``).
        dataset: a ``datasets.Dataset`` (read in ``dataset[i:j]`` slices) or any sequence of dict rows.
        image_column: the column holding the images.
        batch_size: rows encoded per forward pass.
        device: where the model runs (default: the device of its first parameter, else CPU).
        source: what ``dataset`` is, for error messages (e.g. ``"the probe evaluation set"``).

    Returns:
        ``FloatTensor[n, d]`` on CPU, in row order.

    Raises:
        UndecodableImageError: naming the row, ``source`` and the file of an image that cannot be decoded.
    """
    _check_column(dataset, image_column, source)
    if len(dataset) == 0:
        raise ValueError(f"{source} has no rows")
    dataset = _undecoded(dataset, image_column)
    if device is None:
        device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                values = _column(dataset, start, min(start + batch_size, len(dataset)), image_column)
                images = [decode_image(value, row, source) for row, value in enumerate(values, start=start)]
                pixel_values = pixel_values_fn(images).to(device)
                chunks.append(model(pixel_values=pixel_values).features.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


@dataclass
class ProbeEvaluator:
    """Probe accuracies of backbone features: fit the probes on ``train_dataset``, measure them on ``test_dataset``.

    Both splits need ``image_column`` and ``label_column`` (checked at construction). ``__call__(model, device=None)``
    extracts the features of both splits with :func:`extract_features` and returns :func:`probe_metrics`' four
    accuracies: ``linear_probe_accuracy``, ``knn_accuracy``, ``fewshot_linear_probe_accuracy`` and
    ``fewshot_knn_accuracy``. Few-shot probes need ``shots_per_class`` train examples of every class.
    ``train_name`` and ``test_name`` say what the splits are in error messages (e.g. an undecodable image's).
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
    train_name: str = "the probe-fitting set"
    test_name: str = "the probe evaluation set"

    def __post_init__(self) -> None:
        for name, dataset in (("train_dataset", self.train_dataset), ("test_dataset", self.test_dataset)):
            for column in (self.image_column, self.label_column):
                try:
                    _check_column(dataset, column, f"ProbeEvaluator: {name}")
                except ValueError as error:
                    raise ValueError(
                        f"{error} (set image_column / label_column, recipes: --image_column / --label_column)"
                    ) from None

    def check_few_shot(self) -> None:
        """Raise a ``ValueError`` naming the class when a class of ``train_dataset`` has fewer than
        ``shots_per_class`` examples (the few-shot probes would fail after the features are extracted)."""
        labels, counts = np.unique(_labels(self.train_dataset, self.label_column), return_counts=True)
        short = [(label, count) for label, count in zip(labels.tolist(), counts.tolist(), strict=True)]
        short = [(label, count) for label, count in short if count < self.shots_per_class]
        if short:
            label, count = short[0]
            raise ValueError(
                f"{self.train_name}: class {label} has {count} labelled example(s), fewer than shots_per_class="
                f"{self.shots_per_class} ({len(short)} class(es) short)"
            )

    def __call__(self, model: torch.nn.Module, device: torch.device | str | None = None) -> dict[str, float]:
        """``{"linear_probe_accuracy", "knn_accuracy", "fewshot_linear_probe_accuracy", "fewshot_knn_accuracy"}``."""
        train_features, test_features = self._features(model, device)
        return probe_metrics(
            train_features,
            _labels(self.train_dataset, self.label_column),
            test_features,
            _labels(self.test_dataset, self.label_column),
            self.shots_per_class,
            self.num_draws,
            self.seed,
        )

    def knn(self, model: torch.nn.Module, device: torch.device | str | None = None) -> float:
        """1-NN accuracy only (no linear probe): the cheap metric for monitoring during training."""
        train_features, test_features = self._features(model, device)
        return knn_accuracy(
            train_features,
            _labels(self.train_dataset, self.label_column),
            test_features,
            _labels(self.test_dataset, self.label_column),
        )

    def _features(self, model: torch.nn.Module, device: torch.device | str | None) -> tuple[torch.Tensor, ...]:
        return tuple(
            extract_features(model, self.pixel_values_fn, dataset, self.image_column, self.batch_size, device, name)
            for dataset, name in ((self.train_dataset, self.train_name), (self.test_dataset, self.test_name))
        )
