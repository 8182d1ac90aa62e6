"""Probes: linear probe, 1-NN and few-shot accuracy against their definitions."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.utils import ModelOutput

from emc2_hf.evaluation import (
    ProbeCallback,
    ProbeEvaluator,
    extract_features,
    few_shot_accuracies,
    few_shot_indices,
    knn_accuracy,
    linear_probe_accuracy,
    probe_metrics,
)


def blobs(n_per_class=30, classes=4, dim=8, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    features = np.concatenate([centres[c] + spread * rng.normal(size=(n_per_class, dim)) for c in range(classes)])
    return features.astype(np.float32), np.repeat(np.arange(classes), n_per_class)


def test_separable_data_is_probed_perfectly_and_random_labels_at_chance():
    x, y = blobs()
    assert linear_probe_accuracy(x, y, x + 0.01, y) == 1.0
    assert knn_accuracy(x, y, x + 0.01, y) == 1.0
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    assert abs(knn_accuracy(train, rng.integers(0, 4, 400), test, rng.integers(0, 4, 400)) - 0.25) < 0.08


def test_one_nn_agrees_with_a_brute_force_cosine_loop():
    rng = np.random.default_rng(2)
    train, test = rng.normal(size=(50, 5)), rng.normal(size=(30, 5))
    train_y, test_y = rng.integers(0, 3, 50), rng.integers(0, 3, 30)
    correct = 0
    for row, label in zip(test, test_y, strict=False):
        similarity = [row @ t / (np.linalg.norm(row) * np.linalg.norm(t)) for t in train]
        correct += train_y[int(np.argmax(similarity))] == label
    assert knn_accuracy(train, train_y, test, test_y) == pytest.approx(correct / 30)
    # Cosine: rescaling any feature vector changes nothing.
    assert knn_accuracy(train * rng.uniform(0.1, 10, (50, 1)), train_y, test, test_y) == pytest.approx(correct / 30)


def test_k_nearest_neighbours_vote_by_majority():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])
    labels = np.array([1, 2, 2, 1])
    query = np.array([[1.0, 0.0]])
    assert knn_accuracy(train, labels, query, np.array([1]), k=1) == 1.0
    assert knn_accuracy(train, labels, query, np.array([2]), k=3) == 1.0


def test_few_shot_indices_pick_k_per_class_reproducibly():
    labels = np.repeat(np.arange(5), 12)
    picked = few_shot_indices(labels, 3, seed=0)
    assert np.bincount(labels[picked]).tolist() == [3] * 5
    assert np.array_equal(picked, few_shot_indices(labels, 3, seed=0))
    assert not np.array_equal(picked, few_shot_indices(labels, 3, seed=1))
    with pytest.raises(ValueError, match="class 4 has 2 labelled examples"):
        few_shot_indices(np.array([0, 0, 0, 4, 4]), 3, seed=0)


def test_probe_metrics_returns_four_fractions():
    x, y = blobs()
    metrics = probe_metrics(x, y, x, y, shots_per_class=2, num_draws=2)
    assert set(metrics) == {
        "linear_probe_accuracy",
        "knn_accuracy",
        "fewshot_linear_probe_accuracy",
        "fewshot_knn_accuracy",
    }
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_digits_raw_pixels_saturate_full_label_probes_but_not_five_shot_ones():
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.3, random_state=0, stratify=digits.target
    )
    assert knn_accuracy(x_train, y_train, x_test, y_test) > 0.97
    few = few_shot_accuracies(x_train, y_train, x_test, y_test, shots_per_class=5, num_draws=5)
    assert 0.6 < few["fewshot_knn_accuracy"] < 0.95


class MeanColour(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, pixel_values):
        return ModelOutput(features=pixel_values.mean(dim=(2, 3)) * self.scale)


def test_extract_features_encodes_every_row_without_gradients_and_restores_the_mode():
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (8, 8), (i * 10, 0, 0)) for i in range(7)]
    dataset = datasets.Dataset.from_dict({"image": images, "label": list(range(7))})

    def to_pixels(values):
        return torch.stack([torch.tensor(np.asarray(v), dtype=torch.float32).permute(2, 0, 1) for v in values])

    model = MeanColour().train()
    features = extract_features(model, to_pixels, dataset, batch_size=3)
    assert features.shape == (7, 3) and not features.requires_grad and model.training
    assert features[:, 0].tolist() == [i * 10.0 for i in range(7)]
    with pytest.raises(ValueError, match=r"no column 'img'.*\['image', 'label'\]"):
        extract_features(model, to_pixels, dataset, image_column="img")
    with pytest.raises(ValueError, match="test_dataset has no column 'label'"):
        ProbeEvaluator(dataset, dataset.remove_columns("label"), to_pixels)


def test_probe_callback_asks_for_evaluation_periodically_and_at_the_end(tmp_path):
    callback = ProbeCallback(eval_steps=3)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState(max_steps=7)
    asked = []
    for step in range(1, 8):
        state.global_step = step
        control = callback.on_step_end(args, state, TrainerControl())
        asked.append(control.should_evaluate)
    assert asked == [False, False, True, False, False, True, True]
