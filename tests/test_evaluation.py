"""Probes: linear probe, k-NN and few-shot accuracy against their definitions; feature extraction; the callback."""

from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
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

PROBE_KEYS = {"linear_probe_accuracy", "knn_accuracy", "fewshot_linear_probe_accuracy", "fewshot_knn_accuracy"}


def blobs(n_per_class=30, classes=4, dim=8, spread=0.3, seed=0):
    """Well-separated Gaussian clusters: ``[classes * n_per_class, dim]`` features and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    features = np.concatenate([centres[c] + spread * rng.normal(size=(n_per_class, dim)) for c in range(classes)])
    return features.astype(np.float32), np.repeat(np.arange(classes), n_per_class)


# ---------------------------------------------------------------------------------------------------------- probes


def test_separable_clusters_are_probed_perfectly():
    train_x, train_y = blobs(seed=0)
    test_x, test_y = train_x + np.random.default_rng(1).normal(scale=0.05, size=train_x.shape), train_y
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) == 1.0
    assert knn_accuracy(train_x, train_y, test_x, test_y) == 1.0
    # Tensors are accepted as well as arrays.
    assert knn_accuracy(torch.from_numpy(train_x), torch.from_numpy(train_y), test_x, test_y) == 1.0


def test_random_labels_are_probed_at_chance():
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    train_y, test_y = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    assert abs(linear_probe_accuracy(train, train_y, test, test_y) - 0.25) < 0.08
    assert abs(knn_accuracy(train, train_y, test, test_y) - 0.25) < 0.08


def test_one_nn_predicts_exactly_what_a_brute_force_cosine_loop_predicts():
    rng = np.random.default_rng(2)
    train, test = rng.normal(size=(50, 5)), rng.normal(size=(30, 5))
    train_y = rng.integers(0, 3, 50)
    brute_force = []
    for row in test:
        distances = [1 - row @ t / (np.linalg.norm(row) * np.linalg.norm(t)) for t in train]
        brute_force.append(train_y[int(np.argmin(distances))])
    # Accuracy 1.0 against the brute-force predictions means every single prediction is equal.
    assert knn_accuracy(train, train_y, test, np.array(brute_force)) == 1.0
    # And the accuracy against other labels is the fraction of predictions that match them.
    test_y = rng.integers(0, 3, 30)
    assert knn_accuracy(train, train_y, test, test_y) == np.mean(np.array(brute_force) == test_y)


def test_knn_is_invariant_to_rescaling_any_feature_vector():
    rng = np.random.default_rng(3)
    train, test = rng.normal(size=(60, 6)), rng.normal(size=(40, 6))
    train_y, test_y = rng.integers(0, 4, 60), rng.integers(0, 4, 40)
    reference = knn_accuracy(train, train_y, test, test_y, k=3)
    rescaled_train = train * rng.uniform(0.01, 100, size=(60, 1))
    rescaled_test = test * rng.uniform(0.01, 100, size=(40, 1))
    assert knn_accuracy(rescaled_train, train_y, rescaled_test, test_y, k=3) == reference


def test_k_nearest_neighbours_vote_by_majority_and_break_ties_by_the_nearer_neighbour():
    # Angles from the query [1, 0]: 0°, ~6°, ~14°, 90° (nearest first).
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])
    query = np.array([[1.0, 0.0]])
    labels = np.array([1, 2, 2, 1])
    assert knn_accuracy(train, labels, query, np.array([1]), k=1) == 1.0  # the nearest is a 1
    assert knn_accuracy(train, labels, query, np.array([2]), k=3) == 1.0  # but two of the three nearest are 2s
    assert knn_accuracy(train, labels, query, np.array([1]), k=4) == 1.0  # 2 against 2: the nearest (a 1) wins
    assert knn_accuracy(train, 3 - labels, query, np.array([2]), k=4) == 1.0  # ... even when it is the larger label
    # Labels need not be small non-negative integers.
    assert knn_accuracy(train, np.array(["b", "a", "a", "b"]), query, np.array(["a"]), k=3) == 1.0
    assert knn_accuracy(train, np.array([-7, 9, 9, -7]), query, np.array([-7]), k=4) == 1.0


def test_probes_reject_mismatched_features_and_labels():
    x, y = blobs()
    with pytest.raises(ValueError, match=r"train features must be \[n, d\] and labels \[n\]"):
        knn_accuracy(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="test features"):
        linear_probe_accuracy(x, y, x[:, 0], y)


# ------------------------------------------------------------------------------------------------------- few-shot


def test_few_shot_indices_pick_exactly_k_distinct_examples_per_class_reproducibly():
    labels = np.repeat(np.arange(5), 12)
    picked = few_shot_indices(labels, 3, seed=0)
    assert len(np.unique(picked)) == len(picked) == 15
    assert np.bincount(labels[picked]).tolist() == [3] * 5
    assert np.array_equal(picked, few_shot_indices(labels, 3, seed=0))
    assert not np.array_equal(picked, few_shot_indices(labels, 3, seed=1))


def test_few_shot_indices_name_a_class_that_is_too_small():
    with pytest.raises(ValueError, match="class 4 has 2 labelled examples, fewer than shots_per_class=3"):
        few_shot_indices(np.array([0, 0, 0, 4, 4]), 3, seed=0)


def test_few_shot_accuracies_average_the_probes_over_draws():
    x, y = blobs(n_per_class=20)
    test_x, test_y = blobs(n_per_class=20, seed=0)
    few = few_shot_accuracies(x, y, test_x, test_y, shots_per_class=2, num_draws=3, seed=5)
    expected_knn = np.mean(
        [
            knn_accuracy(x[subset], y[subset], test_x, test_y)
            for subset in (few_shot_indices(y, 2, seed) for seed in (5, 6, 7))
        ]
    )
    assert set(few) == {"fewshot_linear_probe_accuracy", "fewshot_knn_accuracy"}
    assert few["fewshot_knn_accuracy"] == pytest.approx(expected_knn)


def test_probe_metrics_returns_the_four_accuracies_as_fractions():
    x, y = blobs()
    rng = np.random.default_rng(4)
    for labels in (y, rng.permutation(y)):
        metrics = probe_metrics(x, labels, x + 0.01, labels, shots_per_class=2, num_draws=2)
        assert set(metrics) == PROBE_KEYS
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values())
    assert probe_metrics(x, y, x, y, shots_per_class=2, num_draws=2)["knn_accuracy"] == 1.0


def test_digits_raw_pixels_saturate_full_label_probes_but_not_five_shot_ones():
    """1-NN on raw digits pixels is ~98.5%; with 5 labels per class it drops to ~85%, leaving room to compare."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.3, random_state=0, stratify=digits.target
    )
    metrics = probe_metrics(x_train, y_train, x_test, y_test, shots_per_class=5, num_draws=10, seed=0)
    assert metrics["knn_accuracy"] > 0.97
    assert metrics["linear_probe_accuracy"] > 0.95
    assert 0.6 < metrics["fewshot_knn_accuracy"] < 0.95
    assert 0.6 < metrics["fewshot_linear_probe_accuracy"] < 0.95


# ------------------------------------------------------------------------------------------------ feature extraction


class MeanColour(torch.nn.Module):
    """Features = per-channel mean of the pixels ``[b, 3]``; records the mode and grad state it was called in."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.calls = []

    def forward(self, pixel_values):
        self.calls.append((self.training, torch.is_grad_enabled(), pixel_values.shape[0]))
        return ModelOutput(features=pixel_values.mean(dim=(2, 3)) * self.scale)


def to_pixels(values):
    """Raw PIL images → ``FloatTensor[b, 3, H, W]``."""
    return torch.stack([torch.tensor(np.asarray(v), dtype=torch.float32).permute(2, 0, 1) for v in values])


def colour_dataset(colours, labels=None):
    """A ``datasets.Dataset`` of uniform 8x8 images; ``colours`` are RGB tuples or red levels."""
    colours = [c if isinstance(c, tuple) else (c, 0, 0) for c in colours]
    images = [Image.new("RGB", (8, 8), colour) for colour in colours]
    return datasets.Dataset.from_dict({"image": images, "label": labels or list(range(len(colours)))})


def test_extract_features_encodes_every_row_in_eval_mode_without_gradients():
    dataset = colour_dataset([i * 10 for i in range(7)])
    model = MeanColour().train()
    features = extract_features(model, to_pixels, dataset, batch_size=3)
    assert features.shape == (7, 3) and features.dtype == torch.float32 and features.device.type == "cpu"
    assert features[:, 0].tolist() == [i * 10.0 for i in range(7)]
    assert not features.requires_grad and model.scale.grad is None
    assert model.calls == [(False, False, 3), (False, False, 3), (False, False, 1)]
    assert model.training  # restored
    model.eval()
    extract_features(model, to_pixels, dataset)
    assert not model.training  # restored too


class GreenMean(torch.nn.Module):
    """No parameters; returns float64 features in a ``SimpleNamespace``."""

    def forward(self, pixel_values):
        return SimpleNamespace(features=pixel_values.mean(dim=(2, 3)).double())


def test_extract_features_reads_plain_row_lists_and_parameterless_models():
    rows = [{"image": Image.new("RGB", (4, 4), (0, 5 * i, 0))} for i in range(5)]
    features = extract_features(GreenMean(), to_pixels, rows, batch_size=2)
    assert features.dtype == torch.float32 and features[:, 1].tolist() == [5.0 * i for i in range(5)]


def test_extract_features_names_a_missing_column_and_lists_the_others():
    dataset = colour_dataset([0, 1])
    with pytest.raises(ValueError, match=r"no column 'img'.*\['image', 'label'\]"):
        extract_features(MeanColour(), to_pixels, dataset, image_column="img")


def test_probe_evaluator_checks_its_columns_at_construction():
    dataset = colour_dataset([0, 1])
    with pytest.raises(ValueError, match=r"test_dataset has no column 'label'; its columns are \['image'\]"):
        ProbeEvaluator(dataset, dataset.remove_columns("label"), to_pixels)
    with pytest.raises(ValueError, match=r"train_dataset has no column 'picture'.*\['image', 'label'\]"):
        ProbeEvaluator(dataset, dataset, to_pixels, image_column="picture")


def test_probe_evaluator_fits_on_the_train_split_and_measures_the_test_split():
    # Two classes, reddish and greenish (different directions, as cosine k-NN needs); the test split adds some blue.
    colours = [(200, 10 * i, 0) for i in range(6)] + [(10 * i, 200, 0) for i in range(6)]
    labels = [0] * 6 + [1] * 6
    shifted = [(r, g, 20) for r, g, _ in colours]
    train, test = colour_dataset(colours, labels), colour_dataset(shifted, labels)
    evaluator = ProbeEvaluator(train, test, to_pixels, shots_per_class=2, num_draws=3, batch_size=5)
    model = MeanColour().train()
    metrics = evaluator(model)
    assert set(metrics) == PROBE_KEYS
    assert metrics["linear_probe_accuracy"] == metrics["knn_accuracy"] == 1.0
    assert model.training
    # Labels that contradict the train split's are measured as wrong.
    flipped = colour_dataset(shifted, [1 - label for label in labels])
    assert ProbeEvaluator(train, flipped, to_pixels, shots_per_class=2, num_draws=1)(model)["knn_accuracy"] == 0.0


# --------------------------------------------------------------------------------------------------------- callback


def steps_asked_to_evaluate(callback, max_steps, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState(max_steps=max_steps)
    asked = []
    for step in range(1, max_steps + 1):
        state.global_step = step
        control = TrainerControl()
        callback.on_step_end(args, state, control)
        if control.should_evaluate:
            asked.append(step)
    return asked


def test_probe_callback_asks_for_evaluation_every_eval_steps_and_at_the_end(tmp_path):
    assert steps_asked_to_evaluate(ProbeCallback(eval_steps=3), 7, tmp_path) == [3, 6, 7]
    assert steps_asked_to_evaluate(ProbeCallback(eval_steps=3), 6, tmp_path) == [3, 6]
    assert steps_asked_to_evaluate(ProbeCallback(), 5, tmp_path) == [5]
