"""Evaluation: probes of frozen features (linear, 1-NN, few-shot) and exact global-loss diagnostics."""

from .callbacks import KNNMonitorCallback, ProbeCallback
from .diagnostics import (
    GlobalDiagnostics,
    GlobalLossCallback,
    check_diagnostics_size,
    fixed_views,
    global_loss_and_gradient,
)
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
    "GlobalDiagnostics",
    "GlobalLossCallback",
    "KNNMonitorCallback",
    "ProbeCallback",
    "ProbeEvaluator",
    "check_diagnostics_size",
    "extract_features",
    "few_shot_accuracies",
    "few_shot_indices",
    "fixed_views",
    "global_loss_and_gradient",
    "knn_accuracy",
    "linear_probe_accuracy",
    "probe_metrics",
]
