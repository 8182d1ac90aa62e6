"""PNG figures a person looks at after a run: training curves of one run, and comparisons of several (bars of the
probes; mean curves with ±1 std bands).

Both use matplotlib's non-interactive Agg backend (no display needed) and write their numbers as JSON beside the PNG.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CURVES_NAME = "training_curves"
LOSS = "loss"
KNN_MONITOR = "knn_monitor_accuracy"
# Logged with the monitor's accuracy (the x of a curve against images seen / training time), not curves of their own.
KNN_MONITOR_AXES = ("knn_monitor_train_seconds", "knn_monitor_samples")
PROBE_PREFIXES = ("eval_", "untrained_")
# Logged every step but not a curve a person reads here (the schedule is set by the flags).
_NOT_PLOTTED = {"learning_rate", "grad_norm", "epoch", "step", "total_flos"}


def training_curves(log_history: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """``{metric: {"step": [...], "value": [...]}}`` of the per-step training logs (``trainer.state.log_history``).

    Kept: ``loss``, every other number logged with it (the objective's metrics, e.g. EMC²'s ``acceptance_rate`` and
    ``*_fraction``s), ``knn_monitor_accuracy`` and its ``knn_monitor_train_seconds`` / ``knn_monitor_samples``
    (:data:`KNN_MONITOR_AXES`, not plotted by :func:`plot_training_curves`); left out: the learning rate, gradient
    norm, epoch, the probes (``eval_*``, ``untrained_*``: :func:`probe_curves`) and the end-of-training summary
    (``train_*``).
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


def probe_curves(log_history: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """``{metric: {"step": [...], "value": [...]}}`` of the probe evaluations in ``log_history``: the untrained
    encoder's (``untrained_*_accuracy``, at the step it was measured, normally 0) and every evaluation during and at
    the end of training (``eval_*_accuracy``, e.g. every ``eval_steps`` with ``eval_strategy="steps"``)."""
    curves: dict[str, dict[str, list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for name, value in entry.items():
            if not (name.startswith(PROBE_PREFIXES) and name.endswith("_accuracy")):
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

    The JSON holds :func:`training_curves` and, besides, the probe evaluations (:func:`probe_curves`), so that the
    whole history a comparison reads survives runs without checkpoints (``--save_strategy no``).

    Panels, one per group: the loss (the batch's NT-Xent, comparable across objectives); the objective's metrics, all
    fractions in [0, 1] (acceptance rate, outside-batch / re-encoded fractions, ...); the 1-NN monitor accuracy.
    """
    curves = training_curves(log_history)
    if not curves:
        return None
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, f"{CURVES_NAME}.json")
    with open(json_path, "w") as handle:
        json.dump({**curves, **probe_curves(log_history)}, handle, indent=1)

    objective_metrics = sorted(name for name in curves if name not in (LOSS, KNN_MONITOR, *KNN_MONITOR_AXES))
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


@dataclass(frozen=True)
class MeanCurve:
    """One line of :func:`plot_mean_curves`: the mean over seeds at each ``x``, drawn with a ±1 std band.

    Attributes:
        label: the configuration, in the legend; lines with the same label share a colour in every panel.
        x: the positions (images seen, seconds, ...), increasing.
        mean: the mean at each ``x``.
        std: the standard deviation at each ``x`` (0 where there is one seed: no band).
        style: what the line shows when a panel holds several kinds (e.g. ``"LP"``, ``"5-shot LP"``): one line
            style per kind, named in a second legend; ``""`` for a solid line and no second legend.
    """

    label: str
    x: Sequence[float]
    mean: Sequence[float]
    std: Sequence[float]
    style: str = ""


_LINE_STYLES = ("-", "--", ":", "-.")


def plot_mean_curves(
    panels: Sequence[tuple[str, Sequence[MeanCurve]]],
    path: str,
    xlabel: str,
    ylabel: str = "accuracy",
    title: str | None = None,
) -> str:
    """Side-by-side panels of mean curves with shaded ±1 std bands; returns ``path`` (a PNG).

    Args:
        panels: ``(panel title, its curves)`` per panel, left to right; panels without curves are left out.
        path: the PNG to write.
        xlabel: the x axis's name (shared by the panels).
        ylabel: the y axis's name.
        title: the figure's title.
    """
    panels = [(name, curves) for name, curves in panels if curves]
    if not panels:
        raise ValueError("plot_mean_curves needs at least one curve")
    plt = _pyplot()
    from matplotlib.lines import Line2D

    labels = list(dict.fromkeys(curve.label for _, curves in panels for curve in curves))
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colours = {label: palette(k % palette.N) for k, label in enumerate(labels)}
    # The configurations' legend goes below the panels (a comparison has up to a dozen lines; inside, it would
    # cover them), two columns.
    legend_rows = (len(labels) + 1) // 2
    legend_height = 0.25 * legend_rows + 0.15
    height = 4.3 + legend_height
    figure, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), height), squeeze=False)
    for axis, (panel_title, curves) in zip(axes[0], panels, strict=True):
        styles = list(dict.fromkeys(curve.style for curve in curves if curve.style))
        for curve in curves:
            x, mean, std = (np.asarray(values, dtype=float) for values in (curve.x, curve.mean, curve.std))
            colour = colours[curve.label]
            linestyle = _LINE_STYLES[styles.index(curve.style) % len(_LINE_STYLES)] if curve.style else "-"
            marker = "o" if len(x) <= 30 else None
            axis.plot(x, mean, color=colour, linestyle=linestyle, marker=marker, markersize=3, linewidth=1.5)
            if np.any(std > 0):
                axis.fill_between(x, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)
        axis.set_title(panel_title, fontsize=10)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if styles:
            handles = [Line2D([], [], color="black", linestyle=_LINE_STYLES[k % 4]) for k in range(len(styles))]
            axis.legend(handles, styles, fontsize=8, loc="upper left")
    handles = [Line2D([], [], color=colours[label], linewidth=2) for label in labels]
    figure.legend(handles, labels, fontsize=8, loc="lower center", ncol=2, frameon=False)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, legend_height / height, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
