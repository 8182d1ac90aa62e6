"""Run one pre-training recipe over a grid (objectives × batch sizes × inverse temperatures × seeds) and report it.

    python recipes/compare.py --dataset_name digits --output_dir runs/compare --max_steps 200 --report_to none
    python recipes/compare.py --objectives emc2,simclr --seeds 0,1,2 --batch_sizes 16,64 \
        --inverse_temperatures 5,14.28 --dataset_name digits --output_dir runs/grid --max_steps 200 --report_to none

Its own flags are below; every other flag goes to the recipe unchanged (``recipes/stl10.py --help`` lists them).
Each configuration trains in ``output_dir/<objective>-b<B>-beta<β>-seed<S>``. Writes ``output_dir/comparison.md`` (one
row per objective, b and β: mean ± std over the seeds of the four probes and the training time, and the untrained
encoder's probes once per seed), ``comparison.json`` (every run's numbers and the aggregates) and ``comparison.png``
(the two few-shot probes per configuration, with ±1 std error bars).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, RECIPES_DIR)

from emc2_hf.objectives import OBJECTIVES, parse_objective_spec  # noqa: E402
from emc2_hf.pretraining import parse_recipe_arguments  # noqa: E402
from emc2_hf.pretraining.plots import plot_comparison  # noqa: E402

# The recipe flag of each objective option a variant ("emc2:weighting=samples,chain_fraction=0.5") may set.
OPTION_FLAGS = {
    "num_proposals": "--num_proposals",
    "burn_in": "--burn_in",
    "gamma": "--sogclr_gamma",
    "weighting": "--emc2_weighting",
    "chain_fraction": "--emc2_chain_fraction",
}
PROBES = ("linear_probe_accuracy", "knn_accuracy", "fewshot_linear_probe_accuracy", "fewshot_knn_accuracy")
PLOTTED_PROBES = ("fewshot_linear_probe_accuracy", "fewshot_knn_accuracy")
# Flags compare.py sets itself for every configuration, and the flag of compare.py to use instead.
OWNED_FLAGS = {
    "objective": "--objectives",
    "seed": "--seeds",
    "per_device_train_batch_size": "--batch_sizes",
    "inverse_temperature": "--inverse_temperatures",
    "resume_from_checkpoint": "--resume",
}
ALWAYS_OWNED = ("objective", "resume_from_checkpoint")


def _recipe(name: str) -> Any:
    import importlib

    return importlib.import_module(name)


def available_objectives() -> list[str]:
    """The registry's objectives (read at run time); ``--objectives`` also takes variants ``name:option=value,…``."""
    return list(OBJECTIVES)


def split_objectives(text: str) -> list[str]:
    """``"emc2:weighting=samples,chain_fraction=0.5,simclr"`` → ``["emc2:weighting=samples,chain_fraction=0.5",
    "simclr"]``: a comma-separated piece with ``=`` and no ``:`` continues the previous variant's options."""
    specs: list[str] = []
    for piece in (part.strip() for part in text.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece and specs:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    if not specs:
        raise argparse.ArgumentTypeError("expected at least one objective")
    return specs


def variant_flags(spec: str) -> tuple[str, list[str]]:
    """``(registry objective, the recipe flags that select the variant)`` of an ``--objectives`` entry."""
    name, options = parse_objective_spec(spec)
    flags = []
    for option, value in options.items():
        if option not in OPTION_FLAGS:
            raise ValueError(f"option {option!r} has no recipe flag; variants may set {sorted(OPTION_FLAGS)}")
        flags += [OPTION_FLAGS[option], str(value)]
    return name, flags


def _list_of(kind: type, what: str):
    def parse(text: str) -> list:
        try:
            values = [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {what[:-1]}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    """compare.py's own flags; ``parse_known_args`` leaves every other flag for the recipe."""
    parser = argparse.ArgumentParser(
        prog="compare.py",
        description=__doc__.split("\n\n")[0],
        epilog="Every other flag is passed to the recipe unchanged (see recipes/stl10.py --help). compare.py sets "
        "--objective, --seed, --output_dir and, when its grid flags are given, --per_device_train_batch_size and "
        "--inverse_temperature itself.",
        allow_abbrev=False,  # otherwise argparse would read the recipe's --objective as --objectives
    )
    parser.add_argument(
        "--objectives",
        type=split_objectives,
        default=None,
        help=f"Comma-separated objectives to compare (default: all of {', '.join(OBJECTIVES)}), or variants "
        "'name:option=value,...' with options " + ", ".join(OPTION_FLAGS) + " (e.g. emc2:weighting=samples).",
    )
    parser.add_argument(
        "--seeds",
        type=_list_of(int, "integers"),
        default=None,
        help="Comma-separated seeds, each a full run of every configuration; the table shows mean ± std over them "
        "(default: one seed, the recipe's --seed).",
    )
    parser.add_argument(
        "--batch_sizes",
        type=_list_of(int, "integers"),
        default=None,
        help="Comma-separated --per_device_train_batch_size values (default: the recipe's one).",
    )
    parser.add_argument(
        "--inverse_temperatures",
        type=_list_of(float, "numbers"),
        default=None,
        help="Comma-separated --inverse_temperature (β) values (default: the recipe's one).",
    )
    parser.add_argument(
        "--output_dir", default="runs/compare", help="Where the runs and the report go (default: runs/compare)."
    )
    parser.add_argument(
        "--recipe", choices=("stl10", "imagenet100"), default="stl10", help="The recipe to run (default: stl10)."
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Reuse configurations whose folder holds eval_results.json and continue those with checkpoints "
        "(--resume_from_checkpoint true); default: every configuration trains from scratch.",
    )
    return parser


@dataclass
class RunConfig:
    """One configuration of the grid and one seed: where it runs and the recipe flags that make it."""

    objective: str
    batch_size: int
    inverse_temperature: float
    seed: int
    output_dir: str
    arguments: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int, float]:
        return self.objective, self.batch_size, self.inverse_temperature


def folder_name(objective: str, batch_size: int, inverse_temperature: float, seed: int) -> str:
    """``<objective>-b<B>-beta<β>-seed<S>``, e.g. ``emc2-b32-beta5-seed42`` (a variant's options joined by ``-``)."""
    name = objective.replace(":", "-").replace(",", "-").replace("=", "")
    return f"{name}-b{batch_size}-beta{inverse_temperature:g}-seed{seed}"


def _flag_name(token: str) -> str | None:
    """``per_device_train_batch_size`` for ``--per_device_train_batch_size``, ``--per-device-train-batch-size=8``."""
    if not token.startswith("--") or token == "--":
        return None
    return token[2:].split("=", 1)[0].replace("-", "_")


def forwarded_flags(arguments: Sequence[str]) -> set[str]:
    return {name for token in arguments if (name := _flag_name(token)) is not None}


def plan_runs(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[RunConfig], list[str]]:
    """``(compare.py's options, every configuration × seed in run order, the flags forwarded to the recipe)``.

    Every configuration's flags are parsed by the recipe's parser here, before anything runs, so a bad flag or value
    stops the comparison at once (one line, exit status 2).
    """
    parser = build_parser()
    options, forwarded = parser.parse_known_args(argv)
    objectives = options.objectives or list(OBJECTIVES)
    selections = {}
    for spec in objectives:
        if spec.partition(":")[0] not in OBJECTIVES:
            choices = ", ".join(available_objectives())
            parser.error(f"--objectives: unknown objective {spec.partition(':')[0]!r}; choose from {choices}")
        try:
            selections[spec] = variant_flags(spec)
        except ValueError as error:
            parser.error(f"--objectives {spec}: {error}")
    given = forwarded_flags(forwarded)
    for flag, ours in OWNED_FLAGS.items():
        if flag in given and (flag in ALWAYS_OWNED or getattr(options, ours[2:]) not in (None, False)):
            parser.error(f"--{flag} is set by compare.py; use {ours} instead")
    recipe = _recipe(options.recipe)
    runs = []
    for seed in options.seeds or [None]:
        for batch_size in options.batch_sizes or [None]:
            for inverse_temperature in options.inverse_temperatures or [None]:
                for objective in objectives:
                    base, selection = selections[objective]
                    arguments = [*forwarded, "--objective", base, *selection]
                    if seed is not None:
                        arguments += ["--seed", str(seed)]
                    if batch_size is not None:
                        arguments += ["--per_device_train_batch_size", str(batch_size)]
                    if inverse_temperature is not None:
                        arguments += ["--inverse_temperature", f"{inverse_temperature:g}"]
                    try:
                        data_args, _, training_args = parse_recipe_arguments(
                            [*arguments, "--output_dir", options.output_dir], recipe.DEFAULTS, recipe.PRESETS_DIR
                        )
                    except (ValueError, FileNotFoundError) as error:
                        parser.error(f"{objective}: {' '.join(str(error).split())}")
                    values = (
                        training_args.per_device_train_batch_size,
                        training_args.inverse_temperature,
                        training_args.seed,
                    )
                    folder = os.path.join(options.output_dir, folder_name(objective, *values))
                    runs.append(RunConfig(objective, *values, folder, [*arguments, "--output_dir", folder]))
                    options.shots_per_class = data_args.shots_per_class
    return options, runs, forwarded


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[RunConfig], results: list[dict[str, float]]) -> dict[str, Any]:
    """Per configuration (objective, b, β): the per-seed probe accuracies and training time, their mean and std
    (sample std; 0 with one seed); and the untrained encoder's probes once per seed, with their mean and std."""
    configurations: dict[tuple, dict[str, Any]] = {}
    untrained_by_seed: dict[int, dict[str, float]] = {}
    for run, result in zip(runs, results, strict=True):
        entry = configurations.setdefault(
            run.key,
            {
                "objective": run.objective,
                "batch_size": run.batch_size,
                "inverse_temperature": run.inverse_temperature,
                "runs": [],
            },
        )
        entry["runs"].append(
            {
                "seed": run.seed,
                "output_dir": run.output_dir,
                **{name: result[f"eval_{name}"] for name in PROBES},
                "train_seconds": result["train_runtime_seconds"],
            }
        )
        untrained_by_seed.setdefault(run.seed, {name: result[f"untrained_{name}"] for name in PROBES})
    for entry in configurations.values():
        for name in (*PROBES, "train_seconds"):
            entry.setdefault("mean", {})[name], entry.setdefault("std", {})[name] = _mean_std(
                [run[name] for run in entry["runs"]]
            )
    untrained: dict[str, Any] = {"runs": [{"seed": seed, **values} for seed, values in untrained_by_seed.items()]}
    for name in PROBES:
        untrained.setdefault("mean", {})[name], untrained.setdefault("std", {})[name] = _mean_std(
            [values[name] for values in untrained_by_seed.values()]
        )
    return {"configurations": list(configurations.values()), "untrained": untrained}


def _cell(mean: float, std: float, seeds: int, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def probe_labels(shots: int) -> dict[str, str]:
    return {
        "linear_probe_accuracy": "LP",
        "knn_accuracy": "1-NN",
        "fewshot_linear_probe_accuracy": f"{shots}-shot LP",
        "fewshot_knn_accuracy": f"{shots}-shot 1-NN",
    }


def format_table(summary: dict[str, Any], shots: int = 5) -> str:
    """The markdown table: one row per (objective, b, β), and the untrained encoder first."""
    labels = probe_labels(shots)
    header = "| encoder | b | β | seeds | " + " | ".join(labels[name] for name in PROBES) + " | train time (s) |"
    lines = [header, "|" + "---|" * (len(PROBES) + 5)]
    untrained = summary["untrained"]
    seeds = len(untrained["runs"])
    cells = [_cell(untrained["mean"][name], untrained["std"][name], seeds) for name in PROBES]
    lines.append(f"| untrained | – | – | {seeds} | " + " | ".join(cells) + " | – |")
    for entry in summary["configurations"]:
        seeds = len(entry["runs"])
        cells = [_cell(entry["mean"][name], entry["std"][name], seeds) for name in PROBES]
        time_cell = _cell(entry["mean"]["train_seconds"], entry["std"]["train_seconds"], seeds, digits=1)
        lines.append(
            f"| {entry['objective']} | {entry['batch_size']} | {entry['inverse_temperature']:g} | {seeds} | "
            + " | ".join(cells)
            + f" | {time_cell} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: str, shots: int = 5) -> str:
    """``comparison.png``: the few-shot probes of the untrained encoder and of every configuration, ±1 std."""
    labels = probe_labels(shots)
    names = ["untrained"] + [
        f"{entry['objective']}\nb={entry['batch_size']} β={entry['inverse_temperature']:g}"
        for entry in summary["configurations"]
    ]
    rows = [summary["untrained"], *summary["configurations"]]
    means = {labels[name]: [row["mean"][name] for row in rows] for name in PLOTTED_PROBES}
    stds = {labels[name]: [row["std"][name] for row in rows] for name in PLOTTED_PROBES}
    seeds = sorted({run["seed"] for run in summary["untrained"]["runs"]})
    title = f"few-shot probes, mean ± std over {len(seeds)} seed(s)"
    return plot_comparison(names, means, stds, path, title=title)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    options, runs, forwarded = plan_runs(argv)
    recipe = _recipe(options.recipe)
    shots = options.shots_per_class
    results = []
    start = time.perf_counter()
    for position, run in enumerate(runs, start=1):
        print(f"[{position}/{len(runs)}] {os.path.basename(run.output_dir)}", file=sys.stderr, flush=True)
        finished = os.path.join(run.output_dir, "eval_results.json")
        if options.resume and os.path.isfile(finished):
            with open(finished) as handle:
                results.append(json.load(handle))
            continue
        arguments = list(run.arguments)
        if options.resume and any(name.startswith("checkpoint-") for name in _listdir(run.output_dir)):
            arguments += ["--resume_from_checkpoint", "true"]
        results.append(recipe.main(arguments))
    total_seconds = time.perf_counter() - start

    summary = aggregate(runs, results)
    table = format_table(summary, shots)
    os.makedirs(options.output_dir, exist_ok=True)
    with open(os.path.join(options.output_dir, "comparison.json"), "w") as handle:
        json.dump(
            {
                **summary,
                "grid": {
                    "objectives": options.objectives or list(OBJECTIVES),
                    "seeds": sorted({run.seed for run in runs}),
                    "batch_sizes": sorted({run.batch_size for run in runs}),
                    "inverse_temperatures": sorted({run.inverse_temperature for run in runs}),
                },
                "recipe": options.recipe,
                "arguments": forwarded,
                "total_seconds": round(total_seconds, 1),
            },
            handle,
            indent=2,
        )
    footer = f"\nTotal wall time: {total_seconds:.0f} s; recipe {options.recipe}, arguments: {' '.join(forwarded)}\n"
    with open(os.path.join(options.output_dir, "comparison.md"), "w") as handle:
        handle.write(table + footer)
    plot(summary, os.path.join(options.output_dir, "comparison.png"), shots)
    print(table + footer)
    return summary


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


if __name__ == "__main__":
    main()
