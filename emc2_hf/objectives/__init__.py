"""Contrastive objectives: one module each, sharing the surrogate of eq. (11), and their registry."""

from __future__ import annotations

import inspect
from typing import Any

from .dcl import DecoupledInfoNCEObjective
from .emc2 import EMC2InBatchObjective, EMC2Objective, visit_frequency_weights
from .global_loss import global_contrastive_loss
from .negative_cache import EmbeddingCache, NegativeCacheObjective
from .problem import (
    NO_STATE,
    ContrastiveProblem,
    ImageTextProblems,
    cross_modal_problem,
    image_text_problems,
    states_to_encode,
    two_view_problem,
)
from .simclr import SimCLRObjective
from .sogclr import SogCLRObjective
from .surrogate import ContrastiveObjective, ObjectiveOutput, info_nce_loss, surrogate_loss
from .symmetric import DIRECTIONS, SymmetricObjective, build_image_text_objective

OBJECTIVES: dict[str, type[ContrastiveObjective]] = {
    objective.name: objective
    for objective in (
        EMC2Objective,
        EMC2InBatchObjective,
        SogCLRObjective,
        SimCLRObjective,
        DecoupledInfoNCEObjective,
        NegativeCacheObjective,
    )
}
"""The registry: every objective by its ``--objective`` name.

Adding an objective is one module and one entry here. The class carries everything else: ``name``, ``title`` (the
model card's), ``citation``, ``card_settings()`` (the card's numbers), and ``training_arguments``, which maps each
of its constructor options to the :class:`~emc2_hf.ContrastiveTrainingArguments` field (``--flag``) that sets it.
The trainer, the recipes and the model card read these; none of them tests an objective's name."""

CONTEXT_OPTIONS = ("num_slots", "embedding_dim")
"""Options the trainer always offers (state slots per example, the embedding width); an objective takes those its
constructor accepts and ignores the rest."""


def option_flags() -> dict[str, str]:
    """``{constructor option: "--training_argument"}`` over the registry (e.g. ``"gamma": "--sogclr_gamma"``)."""
    flags: dict[str, str] = {}
    for objective_class in OBJECTIVES.values():
        for option, field_name in objective_class.training_arguments.items():
            flags.setdefault(option, f"--{field_name}")
    return flags


def objective_options(training_args: Any) -> dict[str, Any]:
    """Every registered objective option read from ``training_args`` (``None`` where unset), for
    :func:`build_objective`, which refuses one set for an objective that does not take it."""
    options: dict[str, Any] = {}
    for objective_class in OBJECTIVES.values():
        for option, field_name in objective_class.training_arguments.items():
            value = getattr(training_args, field_name, None)
            if options.get(option) is None:
                options[option] = value
    return options


def build_objective(
    name: str, num_samples: int, inverse_temperature: float, *, seed: int = 0, **options: Any
) -> ContrastiveObjective:
    """Construct the objective called ``name`` (a key of :data:`OBJECTIVES`) for a training set of ``num_samples``.

    ``options`` are the objective's own hyper-parameters (e.g. ``num_proposals``, ``burn_in`` for EMC²; ``gamma``
    for SogCLR; see each class's ``training_arguments``); ``None`` means the objective's default. Setting one the
    objective does not take is an error naming the objectives that do. :data:`CONTEXT_OPTIONS` are passed only to
    objectives that take them.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    objective_class = OBJECTIVES[name]
    accepted = set(inspect.signature(objective_class.__init__).parameters)
    given = {key: value for key, value in options.items() if value is not None}
    flags = option_flags()
    for key in given:
        if key not in accepted and key not in CONTEXT_OPTIONS:
            takers = sorted(n for n, c in OBJECTIVES.items() if key in inspect.signature(c.__init__).parameters)
            raise ValueError(f"{flags.get(key, key)} applies to the objective(s) {takers}, not {name!r}")
    kwargs = {key: value for key, value in given.items() if key in accepted}
    if "num_samples" in accepted:
        kwargs["num_samples"] = num_samples
    return objective_class(inverse_temperature=inverse_temperature, seed=seed, **kwargs)


def parse_objective_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"emc2:weighting=samples,chain_fraction=0.5"`` → ``("emc2", {"weighting": "samples", "chain_fraction": 0.5})``.

    A registry name, optionally followed by ``:`` and comma-separated ``option=value`` pairs for
    :func:`build_objective` (numbers are parsed as numbers). Unknown names raise a ``ValueError`` listing the
    registry.
    """
    name, _, options_text = spec.partition(":")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r} in {spec!r}; choose one of {sorted(OBJECTIVES)}")
    options: dict[str, Any] = {}
    for item in filter(None, options_text.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"objective option {item!r} in {spec!r} is not key=value")
        for convert in (int, float):
            try:
                options[key] = convert(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return name, options


__all__ = [
    "DIRECTIONS",
    "NO_STATE",
    "OBJECTIVES",
    "ContrastiveObjective",
    "ContrastiveProblem",
    "DecoupledInfoNCEObjective",
    "EMC2InBatchObjective",
    "EMC2Objective",
    "EmbeddingCache",
    "ImageTextProblems",
    "NegativeCacheObjective",
    "ObjectiveOutput",
    "SimCLRObjective",
    "SogCLRObjective",
    "SymmetricObjective",
    "build_image_text_objective",
    "build_objective",
    "objective_options",
    "option_flags",
    "cross_modal_problem",
    "global_contrastive_loss",
    "image_text_problems",
    "info_nce_loss",
    "parse_objective_spec",
    "states_to_encode",
    "surrogate_loss",
    "two_view_problem",
    "visit_frequency_weights",
]
