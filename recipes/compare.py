"""Run one pre-training recipe over a grid (objectives × batch sizes × inverse temperatures × seeds) and report it.

    python recipes/compare.py --dataset_name digits --output_dir runs/compare --max_steps 200 --report_to none
    python recipes/compare.py --objectives emc2,simclr --seeds 0,1,2 --batch_sizes 16,64 \
        --inverse_temperatures 5,14.28 --dataset_name digits --output_dir runs/grid --max_steps 200 --report_to none

The EMC² paper's STL-10 comparison at b = 32 (Fig. 1 and 5: every registered objective, seeds 0, 1, 2, the recipe's
``stl10_b32`` preset, 20 monitor points per run; a GPU job) is one comparison preset, ``recipes/presets/compare/``:

    python recipes/compare.py --config stl10_b32

Its own flags are below; every other flag goes to the recipe unchanged (``recipes/stl10.py --help`` lists them).
``--config NAME`` names a comparison preset of ``recipes/presets/compare/`` (or a YAML file of compare.py's keys);
any other ``--config`` is the recipe's. A recipe config's options of other objectives (e.g. ``stl10_b32``'s EMC²
``burn_in``) are left out for the objectives that do not take them. Each configuration trains in
``output_dir/<objective>-b<B>-beta<β>-seed<S>``. Writes ``output_dir/comparison.md`` (one row per objective, b and β:
mean ± std over the seeds of the four probes and the training time, and the untrained encoder's probes once per
seed), ``comparison.json`` (every run's numbers and the aggregates) and ``comparison.png`` (the two few-shot probes
per configuration, with ±1 std error bars); and, from the 1-NN monitor (``--knn_monitor_steps``, which compare.py
sets to ``max_steps // --knn_monitor_points`` unless given), ``comparison_curves.json`` (per configuration and seed
the monitor's points — step, images seen, training seconds, accuracy — and their mean ± std over the seeds at each
step), ``comparison_vs_samples.png`` and ``comparison_vs_time.png`` (1-NN monitor accuracy against images seen and
against training wall time, monitoring and evaluations excluded; a second panel with the linear probes when the log
histories hold probe evaluations during training, not only the final one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, RECIPES_DIR)

import yaml  # noqa: E402
from comparison_curves import (  # noqa: E402
    CURVES_JSON,
    CURVES_VS_SAMPLES,
    CURVES_VS_TIME,
    _mean_std,
    configuration_entry,
    probe_labels,
    write_curves,
)

from emc2_hf.objectives import OBJECTIVES, option_flags, parse_objective_spec  # noqa: E402
from emc2_hf.pretraining import parse_recipe_arguments  # noqa: E402
from emc2_hf.pretraining.checks import RecipeArgumentError, check_objective_settings  # noqa: E402
from emc2_hf.pretraining.config import ARGUMENT_CLASSES, load_config, resolve_config_path  # noqa: E402
from emc2_hf.pretraining.plots import plot_comparison  # noqa: E402

# The recipe flag of each option a variant ("emc2:weighting=samples,chain_fraction=0.5") may set: every registered
# objective's options (its training_arguments), and the batch selection, which works with any objective
# ("simclr:batch_selection=spectral_clustering").
OPTION_FLAGS = {
    **option_flags(),
    "batch_selection": "--batch_selection",
    "osgd_candidates": "--osgd_candidates",
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
ALL_OBJECTIVES = "all"
COMPARE_PRESETS_DIR = os.path.join(RECIPES_DIR, "presets", "compare")
RECIPE_ARGUMENTS_KEY = "recipe_arguments"  # a comparison preset's flags for the recipe
RECIPE_CONFIG_NAME = "recipe_config.yaml"  # a run's copy of the recipe config, less other objectives' options
# The 1-NN monitor's values in the log history (emc2_hf.evaluation.KNNMonitorCallback) and the probes on the curves.


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


def expand_objectives(specs: Sequence[str] | None) -> list[str]:
    """``specs`` with ``all`` (and no ``--objectives``) replaced by every registered objective, read at run time;
    repeats dropped, order kept: ``["all", "emc2:weighting=samples"]`` → the registry, then the variant."""
    expanded: list[str] = []
    for spec in specs or [ALL_OBJECTIVES]:
        for name in available_objectives() if spec == ALL_OBJECTIVES else [spec]:
            if name not in expanded:
                expanded.append(name)
    return expanded


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def comparison_presets() -> list[str]:
    """The names of the comparison presets in ``recipes/presets/compare/``."""
    if not os.path.isdir(COMPARE_PRESETS_DIR):
        return []
    return sorted(
        os.path.splitext(name)[0] for name in os.listdir(COMPARE_PRESETS_DIR) if name.endswith((".yaml", ".yml"))
    )


def build_parser() -> argparse.ArgumentParser:
    """compare.py's own flags; ``parse_known_args`` leaves every other flag for the recipe."""
    epilog = (
        "Every other flag is passed to the recipe unchanged (see recipes/stl10.py --help). compare.py sets "
        "--objective, --seed, --output_dir and, when its grid flags are given, --per_device_train_batch_size and "
        "--inverse_temperature itself; and --knn_monitor_steps (see --knn_monitor_points). --config NAME_OR_FILE "
        "names a comparison preset, a YAML file of compare.py's flags (objectives, seeds, ...) with the recipe's "
        f"under {RECIPE_ARGUMENTS_KEY} (shipped: {', '.join(comparison_presets()) or 'none'}; flags given beside it "
        "win); any other --config is the recipe's, and its options of other objectives are left out for the "
        "objectives that do not take them."
    )
    parser = argparse.ArgumentParser(
        prog="compare.py",
        description=textwrap.fill(__doc__.split("\n\n")[0], 79),
        # The registry on a line of its own, unwrapped, so that it reads (and greps) as one list.
        epilog=textwrap.fill(epilog, 79) + f"\n\nRegistered objectives (--objectives all): {', '.join(OBJECTIVES)}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # otherwise argparse would read the recipe's --objective as --objectives
    )
    parser.add_argument(
        "--objectives",
        type=split_objectives,
        default=None,
        help="Comma-separated objectives to compare, or 'all' (the default: every registered one, listed below), "
        "or variants "
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
        "--knn_monitor_points",
        type=_positive_int,
        default=10,
        help="Points of the 1-NN monitor curves per run: unless --knn_monitor_steps is given, runs with --max_steps "
        "measure the monitor every max_steps // N steps (replacing a recipe config's value); epoch-based runs keep "
        "their config's --knn_monitor_steps (default: 10).",
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
    recipe_config: dict[str, Any] | None = None  # written to output_dir/recipe_config.yaml before the run

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


def _config_value(token: str, following: str | None) -> tuple[str | None, int]:
    """``(value, tokens it takes)`` of a ``--config VALUE`` / ``--config=VALUE`` token, ``(None, 0)`` otherwise."""
    if token == "--config" and following is not None and not following.startswith("--"):
        return following, 2
    if token.startswith("--config="):
        return token.split("=", 1)[1], 1
    return None, 0


def comparison_preset_path(value: str) -> str | None:
    """The comparison preset ``value`` names (a name in ``recipes/presets/compare/``, or a YAML file that sets keys
    only compare.py has, e.g. ``seeds``), or None: then ``--config value`` is the recipe's."""
    if os.path.basename(value) == value:  # a bare name: a shipped comparison preset?
        for candidate in (value, f"{value}.yaml", f"{value}.yml"):
            path = os.path.join(COMPARE_PRESETS_DIR, candidate)
            if os.path.isfile(path):
                return path
    if os.path.isfile(value) and value.endswith((".yaml", ".yml")):
        with open(value) as handle:
            values = yaml.safe_load(handle)
        recipe_keys = {field.name for cls in ARGUMENT_CLASSES for field in dataclasses.fields(cls)}
        compare_keys = {action.dest for action in build_parser()._actions} - recipe_keys - {"help"}
        if isinstance(values, dict) and set(values) & (compare_keys | {RECIPE_ARGUMENTS_KEY}):
            return value
    return None


def extract_comparison_preset(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(the comparison preset's path or None, argv without it)``; a recipe ``--config`` stays in argv."""
    argv = list(argv)
    position = 0
    while position < len(argv):
        following = argv[position + 1] if position + 1 < len(argv) else None
        value, taken = _config_value(argv[position], following)
        if value is not None and (path := comparison_preset_path(value)) is not None:
            return path, argv[:position] + argv[position + taken :]
        position += max(taken, 1)
    return None, argv


def apply_comparison_preset(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Make the preset's compare.py keys the parser's defaults (flags given beside it win) and return its
    ``recipe_arguments`` as recipe flags (which go before the command line's, so those win)."""
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        parser.error(f"comparison preset {path}: expected a mapping of compare.py's flags to values")
    recipe_values = values.pop(RECIPE_ARGUMENTS_KEY, None) or {}
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    unknown = sorted(set(values) - set(actions))
    if unknown or not isinstance(recipe_values, dict):
        parser.error(
            f"comparison preset {path}: unknown key(s) {unknown or [RECIPE_ARGUMENTS_KEY]}; it may set "
            f"{', '.join(sorted(actions))} and {RECIPE_ARGUMENTS_KEY} (a mapping of the recipe's flags to values)"
        )
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(actions[key], argparse._StoreTrueAction):
            defaults[key] = bool(value)
        else:
            defaults[key] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    parser.set_defaults(**defaults)  # argparse converts a string default with the flag's type
    flags: list[str] = []
    for key, value in recipe_values.items():
        if isinstance(value, list | dict):
            parser.error(f"comparison preset {path}: {RECIPE_ARGUMENTS_KEY}.{key} must be a single value")
        if value is not None:
            flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def _without_config(arguments: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(the first --config value or None, arguments without that --config)``."""
    arguments = list(arguments)
    for position, token in enumerate(arguments):
        following = arguments[position + 1] if position + 1 < len(arguments) else None
        value, taken = _config_value(token, following)
        if value is not None:
            return value, arguments[:position] + arguments[position + taken :]
    return None, arguments


def merge_recipe_flags(preset_flags: Sequence[str], command_line: Sequence[str]) -> list[str]:
    """The preset's recipe flags, then the command line's (later flags win); a ``--config`` on the command line
    replaces the preset's."""
    command_config, _ = _without_config(command_line)
    if command_config is not None:
        _, preset_flags = _without_config(preset_flags)
    return [*preset_flags, *command_line]


def objective_fields() -> dict[str, set[str]]:
    """``{objective: the training arguments of its own options}`` over the registry (e.g. ``sogclr``:
    ``{"sogclr_gamma"}``)."""
    return {name: set(getattr(cls, "training_arguments", {}).values()) for name, cls in OBJECTIVES.items()}


def foreign_settings(config: dict[str, Any], objective: str) -> dict[str, Any]:
    """The settings of ``config`` that are other objectives' options, which ``objective`` would refuse."""
    fields = objective_fields()
    foreign = set().union(*fields.values()) - fields.get(objective, set())
    return {name: value for name, value in config.items() if name in foreign and value is not None}


def plan_runs(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[RunConfig], list[str]]:
    """``(compare.py's options, every configuration × seed in run order, the flags forwarded to the recipe)``.

    Every configuration's flags are parsed by the recipe's parser, and its objective built for them, here, before
    anything runs, so a bad flag or value stops the comparison at once (one line, exit status 2).
    """
    parser = build_parser()
    preset, argv = extract_comparison_preset(sys.argv[1:] if argv is None else argv)
    preset_flags = apply_comparison_preset(parser, preset) if preset is not None else []
    options, command_line = parser.parse_known_args(argv)
    options.config = preset
    forwarded = merge_recipe_flags(preset_flags, command_line)
    objectives = expand_objectives(options.objectives)
    options.objectives = objectives
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

    def parse(arguments: list[str], what: str, config: dict[str, Any] | None = None) -> tuple:
        defaults = recipe.DEFAULTS if config is None else {**recipe.DEFAULTS, **config}
        try:
            return parse_recipe_arguments(
                [*arguments, "--output_dir", options.output_dir], defaults, recipe.PRESETS_DIR
            )
        except (ValueError, FileNotFoundError) as error:
            parser.error(f"{what}: {' '.join(str(error).split())}")

    config_name, without_config = _without_config(forwarded)
    recipe_config: dict[str, Any] | None = None
    if config_name is not None:
        try:
            recipe_config = load_config(resolve_config_path(config_name, recipe.PRESETS_DIR))
        except (ValueError, FileNotFoundError) as error:
            parser.error(f"--config: {' '.join(str(error).split())}")
    data_args, _, training_args = parse(forwarded, "the recipe's flags")
    options.shots_per_class = data_args.shots_per_class
    monitor = []
    if "knn_monitor_steps" not in given and training_args.max_steps > 0:
        monitor = ["--knn_monitor_steps", str(max(1, training_args.max_steps // options.knn_monitor_points))]
    runs = []
    reported: set[str] = set()
    for seed in options.seeds or [None]:
        for batch_size in options.batch_sizes or [None]:
            for inverse_temperature in options.inverse_temperatures or [None]:
                for objective in objectives:
                    base, selection = selections[objective]
                    dropped = foreign_settings(recipe_config or {}, base)
                    own_config = None
                    if dropped:  # the run gets its own copy of the recipe config, less the settings it would refuse
                        own_config = {name: value for name, value in recipe_config.items() if name not in dropped}
                        if objective not in reported:
                            reported.add(objective)
                            settings = ", ".join(f"{name}={value}" for name, value in dropped.items())
                            print(
                                f"compare.py: {objective}: leaving out {settings} of --config {config_name} (options "
                                "of other objectives)",
                                file=sys.stderr,
                            )
                    arguments = [*(forwarded if own_config is None else without_config), *monitor]
                    arguments += ["--objective", base, *selection]
                    if seed is not None:
                        arguments += ["--seed", str(seed)]
                    if batch_size is not None:
                        arguments += ["--per_device_train_batch_size", str(batch_size)]
                    if inverse_temperature is not None:
                        arguments += ["--inverse_temperature", f"{inverse_temperature:g}"]
                    _, _, training_args = parse(arguments, objective, own_config)
                    try:
                        check_objective_settings(training_args)
                    except RecipeArgumentError as error:
                        parser.error(f"{objective}: {' '.join(str(error).split())}")
                    values = (
                        training_args.per_device_train_batch_size,
                        training_args.inverse_temperature,
                        training_args.seed,
                    )
                    folder = os.path.join(options.output_dir, folder_name(objective, *values))
                    if own_config is not None:
                        arguments = ["--config", os.path.join(folder, RECIPE_CONFIG_NAME), *arguments]
                    runs.append(
                        RunConfig(objective, *values, folder, [*arguments, "--output_dir", folder], own_config)
                    )
    return options, runs, forwarded


def aggregate(runs: list[RunConfig], results: list[dict[str, float]]) -> dict[str, Any]:
    """Per configuration (objective, b, β): the per-seed probe accuracies and training time, their mean and std
    (sample std; 0 with one seed); and the untrained encoder's probes once per seed, with their mean and std."""
    configurations: dict[tuple, dict[str, Any]] = {}
    untrained_by_seed: dict[int, dict[str, float]] = {}
    for run, result in zip(runs, results, strict=True):
        entry = configuration_entry(configurations, run)
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
        if run.recipe_config is not None:
            os.makedirs(run.output_dir, exist_ok=True)
            with open(os.path.join(run.output_dir, RECIPE_CONFIG_NAME), "w") as handle:
                yaml.safe_dump(run.recipe_config, handle, sort_keys=False)
        if options.resume and any(name.startswith("checkpoint-") for name in _listdir(run.output_dir)):
            arguments += ["--resume_from_checkpoint", "true"]
        results.append(recipe.main(arguments))
    total_seconds = time.perf_counter() - start

    summary = aggregate(runs, results)
    table = format_table(summary, shots)
    os.makedirs(options.output_dir, exist_ok=True)
    curve_files = write_curves(runs, options.output_dir, shots, results)
    with open(os.path.join(options.output_dir, "comparison.json"), "w") as handle:
        json.dump(
            {
                **summary,
                "grid": {
                    "objectives": options.objectives,
                    "seeds": sorted({run.seed for run in runs}),
                    "batch_sizes": sorted({run.batch_size for run in runs}),
                    "inverse_temperatures": sorted({run.inverse_temperature for run in runs}),
                },
                "recipe": options.recipe,
                "comparison_preset": options.config,
                "arguments": forwarded,
                "curves": [os.path.basename(path) for path in curve_files],
                "total_seconds": round(total_seconds, 1),
            },
            handle,
            indent=2,
        )
    footer = f"\nTotal wall time: {total_seconds:.0f} s; recipe {options.recipe}, arguments: {' '.join(forwarded)}\n"
    if curve_files:
        footer += (
            f"\n1-NN monitor curves: {CURVES_VS_SAMPLES} (against images seen) and {CURVES_VS_TIME} (against training "
            f"time), numbers in {CURVES_JSON}\n"
        )
    with open(os.path.join(options.output_dir, "comparison.md"), "w") as handle:
        handle.write(table + footer)
    plot(summary, os.path.join(options.output_dir, "comparison.png"), shots)
    print(table + footer)
    return summary


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


if __name__ == "__main__":
    main()
