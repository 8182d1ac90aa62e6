"""The curves of a comparison (the EMC² paper's Fig. 1 and 5): the 1-NN monitor's points of every run, their mean ±
std over the seeds at each step, and the two PNGs (accuracy against images seen and against training wall time).

Used by ``recipes/compare.py``; reads what the recipe leaves in each run's folder (``training_curves.json``, or a
checkpoint's ``trainer_state.json``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers.trainer_utils import get_last_checkpoint

from emc2_hf.pretraining.plots import MeanCurve, plot_mean_curves

if TYPE_CHECKING:
    from compare import RunConfig  # a run: its objective, b, β, seed and folder

MONITOR_ACCURACY = "knn_monitor_accuracy"
MONITOR_SECONDS = "knn_monitor_train_seconds"
MONITOR_SAMPLES = "knn_monitor_samples"
CURVE_PROBES = ("linear_probe_accuracy", "fewshot_linear_probe_accuracy")
CURVES_JSON = "comparison_curves.json"
CURVES_VS_SAMPLES = "comparison_vs_samples.png"
CURVES_VS_TIME = "comparison_vs_time.png"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def probe_labels(shots: int) -> dict[str, str]:
    return {
        "linear_probe_accuracy": "LP",
        "knn_accuracy": "1-NN",
        "fewshot_linear_probe_accuracy": f"{shots}-shot LP",
        "fewshot_knn_accuracy": f"{shots}-shot 1-NN",
    }


def read_log_history(output_dir: str) -> list[dict[str, Any]] | None:
    """A finished run's log history: ``training_curves.json`` (which the recipe writes at the end, with or without
    checkpoints: ``--save_strategy no``) regrouped by step, else its latest checkpoint's ``trainer_state.json``; None
    if it has neither."""
    path = os.path.join(output_dir, "training_curves.json")
    if os.path.isfile(path):
        with open(path) as handle:
            return log_history_from_curves(json.load(handle))
    checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    state = os.path.join(checkpoint, "trainer_state.json") if checkpoint is not None else ""
    if os.path.isfile(state):
        with open(state) as handle:
            return json.load(handle).get("log_history", [])
    return None


def log_history_from_curves(curves: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """``training_curves.json``'s ``{metric: {"step": [...], "value": [...]}}`` as log entries, one per step."""
    entries: dict[int, dict[str, Any]] = {}
    for name, curve in curves.items():
        for step, value in zip(curve["step"], curve["value"], strict=True):
            entries.setdefault(int(step), {"step": int(step)})[name] = value
    return [entries[step] for step in sorted(entries)]


def monitor_points(log_history: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """``[{"step", "samples", "train_seconds", "accuracy"}, ...]``, by step, of every 1-NN monitor value in
    ``log_history`` (an entry without the monitor's time and images seen, from an older run, is left out)."""
    points: dict[int, dict[str, float]] = {}
    for entry in log_history:
        if "step" in entry and all(name in entry for name in (MONITOR_ACCURACY, MONITOR_SECONDS, MONITOR_SAMPLES)):
            step = int(entry["step"])
            points[step] = {
                "step": step,
                "samples": int(entry[MONITOR_SAMPLES]),
                "train_seconds": float(entry[MONITOR_SECONDS]),
                "accuracy": float(entry[MONITOR_ACCURACY]),
            }
    return [points[step] for step in sorted(points)]


def probe_points(
    log_history: Sequence[dict[str, Any]],
    monitor: Sequence[dict[str, float]],
    untrained: dict[str, float] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """Per probe of :data:`CURVE_PROBES`: the untrained encoder's value (at step 0; from ``untrained``, the run's
    results, where the log history does not have it — ``train()`` starts a new one) and every evaluation's
    (``eval_*``: during training with ``--eval_strategy steps``, and at the end) as points like the monitor's. Their
    images seen are the step × the monitor's images per step; their training seconds, which are not logged, are
    interpolated linearly in the step between the monitor's points (from 0 s at step 0; past the last point, at its
    last segment's rate). Empty without monitor points."""
    if not monitor:
        return {}
    per_step = monitor[-1]["samples"] / monitor[-1]["step"]
    steps = [0.0, *(point["step"] for point in monitor)]
    seconds = [0.0, *(point["train_seconds"] for point in monitor)]

    def seconds_at(step: float) -> float:
        if step <= steps[-1]:
            return float(np.interp(step, steps, seconds))
        rate = (seconds[-1] - seconds[-2]) / (steps[-1] - steps[-2])
        return seconds[-1] + rate * (step - steps[-1])

    curves: dict[str, list[dict[str, float]]] = {}
    for name in CURVE_PROBES:
        values: dict[int, float] = {}
        for entry in log_history:
            if f"untrained_{name}" in entry:
                values[0] = float(entry[f"untrained_{name}"])
            if f"eval_{name}" in entry and "step" in entry:
                values[int(entry["step"])] = float(entry[f"eval_{name}"])
        if 0 not in values and f"untrained_{name}" in (untrained or {}):
            values[0] = float(untrained[f"untrained_{name}"])
        curves[name] = [
            {
                "step": step,
                "samples": round(step * per_step),
                "train_seconds": round(seconds_at(step), 3),
                "accuracy": values[step],
            }
            for step in sorted(values)
        ]
    return curves


def mean_over_seeds(per_seed: Sequence[Sequence[dict[str, float]]]) -> list[dict[str, float]]:
    """At every step all seeds have: ``{"step", "samples", "seeds", "train_seconds_mean", "train_seconds_std",
    "accuracy_mean", "accuracy_std"}`` (sample std over the seeds; 0 with one seed)."""
    if not per_seed:
        return []
    by_step = [{point["step"]: point for point in points} for points in per_seed]
    common = set.intersection(*(set(points) for points in by_step))
    aggregated = []
    for step in sorted(common):
        at = [points[step] for points in by_step]
        samples = statistics.fmean(point["samples"] for point in at)
        seconds_mean, seconds_std = _mean_std([point["train_seconds"] for point in at])
        accuracy_mean, accuracy_std = _mean_std([point["accuracy"] for point in at])
        aggregated.append(
            {
                "step": step,
                "samples": int(samples) if samples.is_integer() else samples,
                "seeds": len(at),
                "train_seconds_mean": seconds_mean,
                "train_seconds_std": seconds_std,
                "accuracy_mean": accuracy_mean,
                "accuracy_std": accuracy_std,
            }
        )
    return aggregated


def configuration_entry(configurations: dict[tuple, dict[str, Any]], run: RunConfig) -> dict[str, Any]:
    """The entry of ``run``'s configuration (objective, b, β) in ``configurations``, created empty on first use."""
    return configurations.setdefault(
        run.key,
        {
            "objective": run.objective,
            "batch_size": run.batch_size,
            "inverse_temperature": run.inverse_temperature,
            "runs": [],
        },
    )


def aggregate_curves(
    runs: Sequence[RunConfig],
    histories: Sequence[Sequence[dict[str, Any]] | None],
    results: Sequence[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Per configuration (objective, b, β): per seed the monitor's points (:func:`monitor_points`) and the probes'
    (:func:`probe_points`, the untrained encoder's from ``results``, the runs' returned values), and their mean ±
    std over the seeds at each step (:func:`mean_over_seeds`). Runs without monitor values are listed under
    ``missing``; a configuration none of whose runs has them is left out."""
    configurations: dict[tuple, dict[str, Any]] = {}
    missing = []
    for run, history, result in zip(runs, histories, results or [None] * len(runs), strict=True):
        monitor = monitor_points(history or [])
        if not monitor:
            missing.append(run.output_dir)
            continue
        entry = configuration_entry(configurations, run)
        entry["runs"].append(
            {
                "seed": run.seed,
                "output_dir": run.output_dir,
                "knn_monitor": monitor,
                "probes": probe_points(history or [], monitor, result),
            }
        )
    for entry in configurations.values():
        entry["knn_monitor"] = mean_over_seeds([run["knn_monitor"] for run in entry["runs"]])
        entry["probes"] = {
            name: mean_over_seeds([run["probes"].get(name, []) for run in entry["runs"]]) for name in CURVE_PROBES
        }
    return {
        "metric": MONITOR_ACCURACY,
        "x": {
            "samples": f"images seen ({MONITOR_SAMPLES}: step × per-device batch × processes × accumulation)",
            "train_seconds": f"seconds of training ({MONITOR_SECONDS}: monitoring, evaluations and saves excluded)",
        },
        "configurations": list(configurations.values()),
        "missing": missing,
    }


def curve_label(entry: dict[str, Any], with_beta: bool = False) -> str:
    """The legend's name of a configuration: ``emc2, b=32`` (and ``, β=5`` when the grid has several β)."""
    label = f"{entry['objective']}, b={entry['batch_size']}"
    return label + (f", β={entry['inverse_temperature']:g}" if with_beta else "")


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds >= 2 * 3600:
        return "h", 3600.0
    if seconds >= 120:
        return "min", 60.0
    return "s", 1.0


def _mean_curve(
    entry: dict[str, Any],
    points: list[dict[str, float]],
    x_name: str,
    divisor: float,
    with_beta: bool,
    style: str = "",
) -> MeanCurve:
    """One configuration's line: the mean accuracy (±1 std) over the seeds against ``point[x_name] / divisor``."""
    return MeanCurve(
        label=curve_label(entry, with_beta),
        x=[point[x_name] / divisor for point in points],
        mean=[point["accuracy_mean"] for point in points],
        std=[point["accuracy_std"] for point in points],
        style=style,
    )


def has_probe_curves(curves: dict[str, Any]) -> bool:
    """Whether the probes were evaluated during training: more than one evaluation after step 0 (the untrained
    encoder's), i.e. more than the final one."""
    return any(
        sum(point["step"] > 0 for point in points) > 1
        for entry in curves["configurations"]
        for points in entry["probes"].values()
    )


def plot_curves(curves: dict[str, Any], output_dir: str, shots: int = 5) -> list[str]:
    """``comparison_vs_samples.png`` and ``comparison_vs_time.png``: the 1-NN monitor accuracy, mean over the seeds
    with a ±1 std band, one line per configuration, against images seen and against the mean training time at each
    step; with a second panel of the linear probes when they were evaluated during training."""
    labels = probe_labels(shots)
    configurations = [entry for entry in curves["configurations"] if entry["knn_monitor"]]
    with_beta = len({entry["inverse_temperature"] for entry in configurations}) > 1
    seeds = sorted({len(entry["runs"]) for entry in configurations})
    seeds_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    longest = max(point["train_seconds_mean"] for entry in configurations for point in entry["knn_monitor"])
    unit, scale = _time_unit(longest)
    with_probes = has_probe_curves(curves)
    written = []
    for x_name, divisor, file_name, xlabel, against in (
        ("samples", 1.0, CURVES_VS_SAMPLES, "images seen (samples)", "images seen"),
        (
            "train_seconds_mean",
            scale,
            CURVES_VS_TIME,
            f"training wall time ({unit}; monitoring and evaluations excluded)",
            "training time",
        ),
    ):
        monitor = [_mean_curve(entry, entry["knn_monitor"], x_name, divisor, with_beta) for entry in configurations]
        panels = [("1-NN monitor accuracy", monitor)]
        if with_probes:
            probes = [
                _mean_curve(entry, entry["probes"][name], x_name, divisor, with_beta, labels[name])
                for entry in configurations
                for name in CURVE_PROBES
                if entry["probes"].get(name)
            ]
            panels.append(("linear probes (step 0: the untrained encoder)", probes))
        title = f"accuracy against {against}: mean ± 1 std over {seeds_text} seed(s)"
        written.append(plot_mean_curves(panels, os.path.join(output_dir, file_name), xlabel, title=title))
    return written


def write_curves(
    runs: Sequence[RunConfig],
    output_dir: str,
    shots: int = 5,
    results: Sequence[dict[str, float]] | None = None,
) -> list[str]:
    """Read every run's log history, write ``comparison_curves.json`` and the two curve PNGs; returns their paths.

    Without any monitor values (runs made without ``--knn_monitor_steps``) says so in one line and writes nothing
    (removing the curve files of an earlier comparison in ``output_dir``, which would not match this one).
    """
    curves = aggregate_curves(runs, [read_log_history(run.output_dir) for run in runs], results)
    names = (CURVES_JSON, CURVES_VS_SAMPLES, CURVES_VS_TIME)
    if not curves["configurations"]:
        stale = [name for name in names if os.path.isfile(os.path.join(output_dir, name))]
        for name in stale:
            os.remove(os.path.join(output_dir, name))
        print(
            f"compare.py: the runs logged no {MONITOR_ACCURACY} (made without --knn_monitor_steps), so no curves: "
            f"{', '.join(names)} not written" + (f" (removed the earlier ones: {', '.join(stale)})" if stale else ""),
            file=sys.stderr,
        )
        return []
    if curves["missing"]:
        print(
            f"compare.py: the curves leave out {len(curves['missing'])} run(s) without {MONITOR_ACCURACY} values: "
            + ", ".join(os.path.basename(path) for path in curves["missing"]),
            file=sys.stderr,
        )
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, CURVES_JSON)
    with open(json_path, "w") as handle:
        json.dump(curves, handle, indent=1)
    return [json_path, *plot_curves(curves, output_dir, shots)]
