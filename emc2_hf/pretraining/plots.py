"""PNG figures a person looks at after a run: training curves of one run, and a comparison of several.

Both use matplotlib's non-interactive Agg backend (no display needed) and write their numbers as JSON beside the PNG.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

CURVES_NAME = "training_curves"
LOSS = "loss"
KNN_MONITOR = "knn_monitor_accuracy"
# Logged every step but not a curve a person reads here (the schedule is set by the flags).
_NOT_PLOTTED = {"learning_rate", "grad_norm", "epoch", "step", "total_flos"}


def training_curves(log_history: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """``{metric: {"step": [...], "value": [...]}}`` of the per-step training logs (``trainer.state.log_history``).

    Kept: ``loss``, every other number logged with it (the objective's metrics, e.g. EMC²'s ``acceptance_rate`` and
    ``*_fraction``s) and ``knn_monitor_accuracy``; left out: the learning rate, gradient norm, epoch, the
    probes (``eval_*``, ``untrained_*``) and the end-of-training summary (``train_*``).
    """
    curves: dict[str, dict[str, list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None or "train_runtime" in entry:
            continue
        for name, value in entry.items():
            if name in _NOT_PLOTTED or name.startswith(("eval_", "untrained_", "train_")):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            curve = curves.setdefault(name, {"step": [], "value": []})
            curve["step"].append(int(step))
            curve["value"].append(float(value))
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(
    log_history: Sequence[dict[str, Any]], output_dir: str, title: str | None = None
) -> tuple[str, str] | None:
    """Write ``output_dir/training_curves.png`` and ``training_curves.json``; returns their paths (None if nothing
    was logged).

    Panels, one per group: the loss (the batch's NT-Xent, comparable across objectives); the objective's metrics, all
    fractions in [0, 1] (acceptance rate, outside-batch / re-encoded fractions, ...); the 1-NN monitor accuracy.
    """
    curves = training_curves(log_history)
    if not curves:
        return None
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, f"{CURVES_NAME}.json")
    with open(json_path, "w") as handle:
        json.dump(curves, handle, indent=1)

    objective_metrics = sorted(name for name in curves if name not in (LOSS, KNN_MONITOR))
    panels = [
        (title_, names)
        for title_, names in (
            ("loss (NT-Xent of the batch)", [LOSS] if LOSS in curves else []),
            ("objective's metrics", objective_metrics),
            ("1-NN monitor accuracy", [KNN_MONITOR] if KNN_MONITOR in curves else []),
        )
        if names
    ]
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for axis, (panel_title, names) in zip(axes[0], panels, strict=True):
        for name in names:
            curve = curves[name]
            marker = "o" if len(curve["step"]) < 30 else None
            axis.plot(curve["step"], curve["value"], marker=marker, markersize=3, label=name)
        axis.set_title(panel_title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(names) > 1 or names[0] not in (LOSS, KNN_MONITOR):
            axis.legend(fontsize=8)
        if names != [LOSS]:
            axis.set_ylim(0, 1.02)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    png_path = os.path.join(output_dir, f"{CURVES_NAME}.png")
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    return png_path, json_path


def plot_comparison(
    labels: Sequence[str],
    means: dict[str, Sequence[float]],
    stds: dict[str, Sequence[float]],
    path: str,
    title: str | None = None,
) -> str:
    """Grouped bars (one group per configuration, one bar per metric) with ±1 std error bars; returns ``path``.

    Args:
        labels: configuration names, one per group of bars.
        means: ``{metric: [mean per configuration]}``.
        stds: ``{metric: [std per configuration]}`` (0 where there is one seed).
        path: the PNG to write.
        title: the figure's title.
    """
    import numpy as np

    plt = _pyplot()
    positions = np.arange(len(labels))
    width = 0.8 / max(len(means), 1)
    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 4.2))
    for k, (metric, values) in enumerate(means.items()):
        offset = (k - (len(means) - 1) / 2) * width
        bars = axis.bar(positions + offset, values, width, yerr=stds[metric], capsize=3, label=metric)
        axis.bar_label(bars, labels=[f"{value:.3f}" for value in values], fontsize=7, padding=2)
    axis.set_xticks(positions, labels, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1.05)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    if title:
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
