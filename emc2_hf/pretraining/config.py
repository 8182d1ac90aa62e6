"""Parse a recipe's arguments: recipe defaults < a ``--config`` preset file < command-line flags.

The parser's ``--help`` lists the recipe's own groups first (``--config``, data, model, objective, contrastive
training), each with a description, and the Trainer's flags after them. Launched as several processes on a machine
without an accelerator (``torchrun`` / ``accelerate launch`` on CPU), the defaults become ``--use_cpu true`` so the
processes train one model together over gloo instead of N independent copies.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..training.arguments import ContrastiveTrainingArguments
from .arguments import DataArguments, ModelArguments

ARGUMENT_CLASSES = (DataArguments, ModelArguments, ContrastiveTrainingArguments)
CONFIG_FLAG = "--config"

# ContrastiveTrainingArguments' own fields that are not the objective's: the rest of them form the "objective" group.
CONTRASTIVE_TRAINING_FIELDS = (
    "timm_optimizer",
    "optimizer_momentum",
    "lars_trust_coefficient",
    "knn_monitor_steps",
    "export_projection_head",
)
GROUP_DESCRIPTIONS = {
    "data": "Where the images come from, which splits play which role, and how the views are augmented.",
    "model": "The encoder: a timm backbone and a projection head.",
    "objective": "The contrastive objective (--objective) and its hyper-parameters; the EMC² and SogCLR flags apply "
    "to that objective only.",
    "contrastive training": "Optimiser, monitoring and export settings of the ContrastiveTrainer.",
    "training (transformers.TrainingArguments)": "The Trainer's own flags (output, length, schedule, logging, "
    "checkpoints, processes, Hub); the recipe's defaults differ where noted.",
}


class RecipeArgumentParser(HfArgumentParser):
    """An ``HfArgumentParser`` whose argument errors raise ``ValueError`` (the recipes print them as one line and exit
    with status 2) instead of printing the usage and exiting."""

    def error(self, message: str):
        raise ValueError(f"argument error: {message}")


class RecipeHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: …)`` only where the help does not already speak of the default and there is one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def world_size_from_environment() -> int:
    """The number of processes a launcher (``torchrun``, ``accelerate launch``) started, from ``WORLD_SIZE``."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_main_process_from_environment() -> bool:
    """Whether this process is rank 0 of its launch (or was not launched by a distributed launcher)."""
    return os.environ.get("RANK", "0") == "0"


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, MPS, XPU, ...)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def launch_defaults() -> dict[str, Any]:
    """Training defaults that depend on how the recipe was launched and on what hardware.

    * no accelerator: ``dataloader_pin_memory=False`` (pinning needs one; torch warns on every CPU run otherwise)
      and ``use_cpu=True`` — under several processes it makes the Trainer run distributed data parallel over gloo
      (without it every process would train its own copy on all the data), and it lets ``--bf16 true`` autocast on
      CPU (the Trainer refuses bf16 without an accelerator otherwise);
    * several processes: ``ddp_find_unused_parameters=False`` (the encoder uses every parameter; DDP warns
      otherwise).
    """
    defaults: dict[str, Any] = {}
    several = world_size_from_environment() > 1
    if not has_accelerator():
        defaults["dataloader_pin_memory"] = False
        defaults["use_cpu"] = True
    if several:
        defaults["ddp_find_unused_parameters"] = False
    return defaults


def resolve_config_path(config: str, presets_dir: str | None) -> str:
    """A path as given, or the name of a preset in ``presets_dir`` (with or without ``.yaml``)."""
    if os.path.isfile(config):
        return config
    if presets_dir is not None:
        for candidate in (config, f"{config}.yaml", f"{config}.yml", f"{config}.json"):
            path = os.path.join(presets_dir, candidate)
            if os.path.isfile(path):
                return path
    available = shipped_presets(presets_dir)
    raise FileNotFoundError(
        f"no config file {config!r}" + (f"; the shipped presets are {available}" if available else "")
    )


def shipped_presets(presets_dir: str | None) -> list[str]:
    """File names of the presets in ``presets_dir`` (empty if there is none)."""
    if not (presets_dir and os.path.isdir(presets_dir)):
        return []
    return sorted(name for name in os.listdir(presets_dir) if os.path.isfile(os.path.join(presets_dir, name)))


def load_config(path: str, argument_classes: Sequence[type] = ARGUMENT_CLASSES) -> dict[str, Any]:
    """The flat ``{argument: value}`` mapping of a YAML or JSON config file, checked against the recipe's arguments
    (the fields of ``argument_classes``)."""
    with open(path) as handle:
        values = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of argument names to values")
    known = {field.name for cls in argument_classes for field in fields(cls) if field.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path!r} sets unknown argument(s) {unknown}; see the recipe's --help")
    return values


def build_recipe_parser(
    defaults: dict[str, Any] | None = None,
    presets_dir: str | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> RecipeArgumentParser:
    """The recipe's ``HfArgumentParser``, its groups in reading order and ``defaults`` applied.

    Groups: ``--config`` (with the shipped presets), data, model, objective, contrastive training, then the Trainer's
    flags. Fields the lead adds to :class:`ContrastiveTrainingArguments` join the objective group automatically.
    """
    parser = RecipeArgumentParser(
        ARGUMENT_CLASSES,
        prog=prog,
        description=description,
        formatter_class=RecipeHelpFormatter,
        usage="%(prog)s [--config FILE_OR_PRESET] [--FLAG VALUE ...]",
    )
    presets = [os.path.splitext(name)[0] for name in shipped_presets(presets_dir)]
    parser.add_argument(
        CONFIG_FLAG,
        metavar="FILE_OR_PRESET",
        default=argparse.SUPPRESS,
        help="A YAML or JSON file of flag values (flags given after it win)"
        + (f", or a shipped preset: {', '.join(presets)}." if presets else "."),
    )
    _arrange_groups(parser)
    parser.set_defaults(**(defaults or {}))
    return parser


def _arrange_groups(parser: RecipeArgumentParser) -> None:
    """Move the ContrastiveTrainingArguments' and TrainingArguments' flags out of the top group, into titled groups
    that print after the data and model groups."""
    trainer_fields = {field.name for field in fields(TrainingArguments)}
    contrastive_fields = {field.name for field in fields(ContrastiveTrainingArguments)} - trainer_fields
    top = parser._optionals
    titled = {group.title: group for group in parser._action_groups}
    for title in ("data", "model"):
        if title in titled:
            titled[title].description = GROUP_DESCRIPTIONS[title]
    objective = parser.add_argument_group("objective", GROUP_DESCRIPTIONS["objective"])
    contrastive = parser.add_argument_group("contrastive training", GROUP_DESCRIPTIONS["contrastive training"])
    trainer_title = "training (transformers.TrainingArguments)"
    trainer = parser.add_argument_group(trainer_title, GROUP_DESCRIPTIONS[trainer_title])
    for action in list(top._group_actions):
        if action.dest in ("help", "config"):
            continue
        if action.dest in CONTRASTIVE_TRAINING_FIELDS:
            destination = contrastive
        elif action.dest in contrastive_fields:
            destination = objective
        else:
            destination = trainer
        top._group_actions.remove(action)
        destination._group_actions.append(action)
    top.title = "options"


def _extract_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(config, remaining argv)`` for ``--config FILE``, ``--config=FILE`` or a lone positional ``*.yaml``."""
    for position, argument in enumerate(argv):
        if argument == CONFIG_FLAG:
            if position + 1 >= len(argv) or argv[position + 1].startswith("--"):
                raise ValueError("--config needs a file (or the name of a shipped preset)")
            return argv[position + 1], argv[:position] + argv[position + 2 :]
        if argument.startswith(f"{CONFIG_FLAG}="):
            return argument.split("=", 1)[1], argv[:position] + argv[position + 1 :]
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        return argv[0], []
    return None, argv


def parse_recipe_arguments(
    args: Sequence[str] | None = None,
    defaults: dict[str, Any] | None = None,
    presets_dir: str | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> tuple[DataArguments, ModelArguments, ContrastiveTrainingArguments]:
    """``(data_args, model_args, training_args)`` from ``args`` (default ``sys.argv[1:]``).

    Precedence, lowest first: the dataclasses' defaults, :func:`launch_defaults` (CPU and multi-process settings),
    the recipe's ``defaults``, the file named by ``--config FILE`` (YAML or JSON; a bare name is looked up in
    ``presets_dir``), then the other flags. A single positional ``*.yaml``/``*.json`` argument is read as ``--config``
    too (transformers' example-script convention).

    Raises:
        ValueError: a bad value or combination (from the dataclasses' checks), or an unknown flag.
        FileNotFoundError: a ``--config`` that is neither a file nor a shipped preset.
    """
    argv = list(sys.argv[1:] if args is None else args)
    config, argv = _extract_config(argv)
    values = {**launch_defaults(), **(defaults or {})}
    if config is not None:
        values.update(load_config(resolve_config_path(config, presets_dir)))
    parser = build_recipe_parser(values, presets_dir, prog=prog, description=description)
    data_args, model_args, training_args, *_ = parser.parse_args_into_dataclasses(args=argv)
    if config is not None:
        _drop_other_objectives_options(training_args, values, argv)
    return data_args, model_args, training_args


def _drop_other_objectives_options(training_args: Any, values: dict[str, Any], argv: list[str]) -> None:
    """A preset's options of other objectives (``stl10_b32``'s EMC² ``burn_in`` under ``--objective simclr``) are
    left out, so that a preset serves every objective; the same option given on the command line stays an error."""
    from ..objectives import OBJECTIVES

    taken = set(OBJECTIVES[training_args.objective].training_arguments.values())
    given = {token.split("=")[0].lstrip("-").replace("-", "_") for token in argv if token.startswith("--")}
    dropped = []
    for objective_class in OBJECTIVES.values():
        for field_name in objective_class.training_arguments.values():
            if field_name in taken or field_name in given or values.get(field_name) is None:
                continue
            if getattr(training_args, field_name, None) is not None:
                setattr(training_args, field_name, None)
                dropped.append(field_name)
    if dropped and is_main_process_from_environment():
        logging.getLogger("emc2_hf.pretraining").info(
            "--config: %s left out (they apply to other objectives than %s)",
            ", ".join(f"--{name}" for name in sorted(set(dropped))),
            training_args.objective,
        )
