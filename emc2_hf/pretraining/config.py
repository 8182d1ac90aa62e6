"""Parse a recipe's arguments: recipe defaults < a ``--config`` preset file < command-line flags."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..training.arguments import ContrastiveTrainingArguments
from .arguments import DataArguments, ModelArguments

ARGUMENT_CLASSES = (DataArguments, ModelArguments, ContrastiveTrainingArguments)


def resolve_config_path(config: str, presets_dir: str | None) -> str:
    """A path as given, or the name of a preset in ``presets_dir`` (with or without ``.yaml``)."""
    if os.path.isfile(config):
        return config
    if presets_dir is not None:
        for candidate in (config, f"{config}.yaml", f"{config}.yml", f"{config}.json"):
            path = os.path.join(presets_dir, candidate)
            if os.path.isfile(path):
                return path
    available = sorted(name for name in os.listdir(presets_dir)) if presets_dir and os.path.isdir(presets_dir) else []
    raise FileNotFoundError(
        f"no config file {config!r}" + (f"; the shipped presets are {available}" if available else "")
    )


def load_config(path: str) -> dict[str, Any]:
    """The flat ``{argument: value}`` mapping of a YAML or JSON config file, checked against the recipe's arguments."""
    with open(path) as handle:
        values = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of argument names to values")
    known = {field.name for cls in ARGUMENT_CLASSES for field in fields(cls) if field.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path!r} sets unknown argument(s) {unknown}; see the recipe's --help")
    return values


def parse_recipe_arguments(
    args: Sequence[str] | None = None,
    defaults: dict[str, Any] | None = None,
    presets_dir: str | None = None,
) -> tuple[DataArguments, ModelArguments, ContrastiveTrainingArguments]:
    """``(data_args, model_args, training_args)`` from ``args`` (default ``sys.argv[1:]``).

    Precedence, lowest first: the dataclasses' defaults, the recipe's ``defaults``, the file named by
    ``--config FILE`` (YAML or JSON; a bare name is looked up in ``presets_dir``), then the other flags. A single
    positional ``*.yaml``/``*.json`` argument is read as ``--config`` too (transformers' example-script convention).
    """
    import sys

    argv = list(sys.argv[1:] if args is None else args)
    config = None
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise SystemExit("--config needs a file (or the name of a shipped preset)")
        config = argv[position + 1]
        del argv[position : position + 2]
    elif len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        config, argv = argv[0], []
    values = dict(defaults or {})
    if config is not None:
        values.update(load_config(resolve_config_path(config, presets_dir)))
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=argv)
