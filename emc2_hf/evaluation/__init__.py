"""Evaluation of frozen features: linear probe, 1-NN and their few-shot versions."""

from .callbacks import KNNMonitorCallback, ProbeCallback
from .probes import (
    ProbeEvaluator,
    extract_features,
    few_shot_accuracies,
    few_shot_indices,
    knn_accuracy,
    linear_probe_accuracy,
    probe_metrics,
)

__all__ = [
    "KNNMonitorCallback",
    "ProbeCallback",
    "ProbeEvaluator",
    "extract_features",
    "few_shot_accuracies",
    "few_shot_indices",
    "knn_accuracy",
    "linear_probe_accuracy",
    "probe_metrics",
]
