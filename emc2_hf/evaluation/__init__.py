"""Evaluation: probes of frozen features (linear, 1-NN, few-shot), exact global-loss diagnostics, and dual encoders'
zero-shot classification and image↔text retrieval."""

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
from .retrieval import RetrievalEvaluator, combine_evaluators, retrieval_recall
from .zero_shot import ZeroShotEvaluator, zero_shot_accuracy, zero_shot_classifier

__all__ = [
    "GlobalDiagnostics",
    "GlobalLossCallback",
    "KNNMonitorCallback",
    "ProbeCallback",
    "ProbeEvaluator",
    "RetrievalEvaluator",
    "ZeroShotEvaluator",
    "combine_evaluators",
    "check_diagnostics_size",
    "extract_features",
    "few_shot_accuracies",
    "few_shot_indices",
    "fixed_views",
    "global_loss_and_gradient",
    "knn_accuracy",
    "linear_probe_accuracy",
    "probe_metrics",
    "retrieval_recall",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
