"""Model cards for exported encoders, rendered from the templates in ``model_cards/``."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import jinja2

PROBE_NAMES = {
    "linear_probe_accuracy": ("Linear-probe accuracy", "Linear probe"),
    "knn_accuracy": ("1-NN accuracy", "1-nearest-neighbour"),
    "fewshot_linear_probe_accuracy": ("Few-shot linear-probe accuracy", "Few-shot linear probe"),
    "fewshot_knn_accuracy": ("Few-shot 1-NN accuracy", "Few-shot 1-nearest-neighbour"),
}
SETTING_NAMES = {
    "inverse_temperature": "inverse temperature β",
    "num_proposals": "Metropolis–Hastings proposals R",
    "burn_in": "burn-in P",
    "chains_per_example": "chains per example (one per view)",
    "weighting": "negative weights from the samples",
    "view_choices": "view picks averaged",
    "chain_fraction": "fraction of chains run per epoch",
    "gamma": "moving-average γ",
}


def objective_title(name: str) -> str:
    """The card's title of the objective registered as ``name`` (the name itself if unregistered)."""
    from ..objectives import OBJECTIVES

    return OBJECTIVES[name].title if name in OBJECTIVES else name


@dataclass
class ModelCardData:
    """What the trainer cannot know about a run, for the model card: where the data came from.

    Attributes:
        dataset_name: what the pre-training data is, for the card's text (a Hub name, or a description of local data).
        train_split: split(s) pre-trained on.
        probe_train_split: labelled split the probes were fitted on.
        eval_split: split the probe accuracies were measured on (the model index's ``split``).
        license: the card's license.
        model_name: the card's title (defaults to the repository name).
        hub_dataset_id: the Hub dataset the data came from, for the card's ``datasets`` metadata (only Hub ids belong
            there; local data is described by ``dataset_name`` in the text). None: no ``datasets`` entry.
        eval_split_description: replaces `` `eval_split` `` in the text when the evaluation rows are not a split of
            their own, e.g. ``"a seeded 20% hold-out of `train`"``.
        untrained_metrics: the probes of the encoder before pre-training (keys ``untrained_<probe>`` as
            ``trainer.evaluate(metric_key_prefix="untrained")`` returns them), shown beside the trained ones.
    """

    dataset_name: str | None = None
    train_split: str | None = None
    probe_train_split: str | None = None
    eval_split: str = "test"
    license: str = "apache-2.0"
    model_name: str | None = None
    hub_dataset_id: str | None = None
    eval_split_description: str | None = None
    untrained_metrics: dict[str, float] | None = None
    evaluation_note: str | None = None
    """Dual encoders: a sentence on how zero-shot and retrieval were measured, printed under them on the card."""


def render_model_card(template_name: str = "encoder.md", **values: Any) -> str:
    """Render ``model_cards/<template_name>`` with ``values`` (undefined names raise, so nothing renders blank)."""
    template_text = resources.files("emc2_hf.model_cards").joinpath(template_name).read_text(encoding="utf-8")
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(template_text).render(**values)


def probe_rows(metrics: dict[str, float], prefix: str = "eval") -> list[dict[str, Any]]:
    """The probe accuracies in ``metrics`` (keys ``{prefix}_linear_probe_accuracy`` …) as card rows."""
    rows = []
    for key, (name, task) in PROBE_NAMES.items():
        value = metrics.get(f"{prefix}_{key}")
        if value is not None:
            rows.append({"name": name, "task": task, "value": float(value)})
    return rows


def objective_settings(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(readable name, value)`` of an objective's hyper-parameters, from ``objective.get_config_dict()``."""
    return [(SETTING_NAMES.get(key, key), value) for key, value in config.items() if key != "objective"]
