"""Checks the recipes run before any expensive work: each failure is one line a person can act on (exit status 2).

Order in :func:`~emc2_hf.pretraining.run_pretraining`: the launch and the loggers, the output folder and the
checkpoint to resume, the objective's settings at this batch size (before loading data), the batch against the data
(after loading it), then the resumed checkpoint against the built trainer (before the untrained probes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..sampling.sample_state import PER_SAMPLE_STATE_NAME
from ..training.arguments import ContrastiveTrainingArguments
from .config import has_accelerator, world_size_from_environment

RUN_SETTINGS_NAME = "run_settings.json"
"""Written into every checkpoint by the recipes (:class:`~emc2_hf.pretraining.run.RunSettingsCallback`)."""

# report_to name → (module that must import, what to install).
LOGGER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install 'emc2_hf[tensorboard]'"),
    "trackio": ("trackio", "pip install trackio"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
    "comet_ml": ("comet_ml", "pip install comet_ml"),
    "clearml": ("clearml", "pip install clearml"),
    "dvclive": ("dvclive", "pip install dvclive"),
    "swanlab": ("swanlab", "pip install swanlab"),
}
_TRUE = ("true", "yes", "1", "last", "latest")
_FALSE = ("false", "no", "0", "")


class RecipeArgumentError(ValueError):
    """A flag, or a combination of flags, that cannot work, found before any expensive work.

    The recipes print it as one line, ``<recipe>: error: <message>``, and exit with status 2 like an argument error.
    """


def processes(training_args: ContrastiveTrainingArguments) -> int:
    """How many processes train together (1 without a distributed launch)."""
    return max(int(training_args.world_size), 1)


def objective_batch_size(training_args: ContrastiveTrainingArguments) -> int:
    """Images in one evaluation of the objective: every process's micro-batch (gradient accumulation excluded)."""
    return training_args.per_device_train_batch_size * processes(training_args)


def check_launch(training_args: ContrastiveTrainingArguments) -> None:
    """Several processes on a machine without an accelerator must share one model (``--use_cpu true``), and every
    ``--report_to`` logger must be installed."""
    launched = world_size_from_environment()
    if launched > 1 and not has_accelerator() and not training_args.use_cpu:
        raise RecipeArgumentError(
            f"{launched} processes were launched on a machine without a GPU, and --use_cpu false would make each "
            "train its own copy on all the data: drop --use_cpu false (the recipe then uses --use_cpu true, gloo), or "
            "launch one process"
        )
    if launched > 1 and processes(training_args) != launched:
        raise RecipeArgumentError(
            f"{launched} processes were launched but the Trainer runs {processes(training_args)}: launch with "
            "torchrun or accelerate launch and leave the distributed settings to them"
        )
    known = _known_loggers()
    for name in training_args.report_to or []:
        if known and name not in known:
            raise RecipeArgumentError(f"--report_to {name}: unknown logger; choose from {', '.join(sorted(known))}")
        if name in LOGGER_PACKAGES:
            module, install = LOGGER_PACKAGES[name]
            if name == "tensorboard":
                available = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
            else:
                available = importlib.util.find_spec(module) is not None
            if not available:
                raise RecipeArgumentError(f"--report_to {name} needs the {module} package: {install}")


def _known_loggers() -> set[str]:
    """The ``--report_to`` names transformers knows (empty if it does not say), plus ``all`` and ``none``."""
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:
        return set()
    return {*INTEGRATION_TO_CALLBACK, "all", "none"}


def checkpoints_in(output_dir: str) -> list[str]:
    """The ``checkpoint-<step>`` folders of ``output_dir``, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := pattern.match(name))]
    return [
        os.path.join(output_dir, name) for _, name in sorted(found) if os.path.isdir(os.path.join(output_dir, name))
    ]


def resolve_resume_checkpoint(training_args: ContrastiveTrainingArguments) -> str | None:
    """The checkpoint folder this run continues from, or None for a fresh run.

    ``--resume_from_checkpoint true`` means the latest ``checkpoint-*`` of ``--output_dir`` (transformers'
    ``get_last_checkpoint``); a path must exist. A fresh run into a folder that already holds checkpoints is refused
    rather than started beside them: continuing it implicitly would apply this command's flags to the earlier run.
    """
    value = training_args.resume_from_checkpoint
    output_dir = training_args.output_dir
    text = "" if value is None else str(value).strip()
    if text.lower() in _FALSE:
        latest = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if latest is not None:
            raise RecipeArgumentError(
                f"--output_dir {output_dir} already holds checkpoints of an earlier run (latest: "
                f"{os.path.basename(latest)}); continue it with --resume_from_checkpoint true, or pass a new "
                "--output_dir (or delete the folder) to start over"
            )
        return None
    if text.lower() in _TRUE:
        latest = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if latest is None:
            raise RecipeArgumentError(
                f"--resume_from_checkpoint {text}: {output_dir} holds no checkpoint-* folder to resume from"
            )
        return latest
    if not os.path.isdir(text):
        raise RecipeArgumentError(f"--resume_from_checkpoint {text}: no such checkpoint folder")
    return text


def check_objective_settings(training_args: ContrastiveTrainingArguments) -> None:
    """Build the objective for a 2-row dataset and check it against this run's batch size, before loading data.

    Catches e.g. ``--burn_in 100`` with the default ``R = 2b − 2`` proposals. An objective registry whose
    ``build_objective`` takes other arguments is left to the trainer's construction (checked in the recipe too).
    """
    from ..objectives import build_objective, objective_options

    try:
        objective = build_objective(
            training_args.objective,
            num_samples=2,
            inverse_temperature=training_args.inverse_temperature,
            seed=training_args.seed,
            **objective_options(training_args),
        )
    except TypeError:
        return
    except ValueError as error:
        raise RecipeArgumentError(str(error)) from None
    check_objective_batch_size(objective, objective_batch_size(training_args))


def check_objective_batch_size(objective: Any, batch_size: int) -> None:
    """The objective's own check of a global batch of ``batch_size`` images (``validate_batch_size``: e.g. EMC²'s
    R and P)."""
    try:
        objective.validate_batch_size(batch_size)
    except ValueError as error:
        raise RecipeArgumentError(f"at a batch of {batch_size} images: {error}") from None


def check_batch_fits_data(num_rows: int, training_args: ContrastiveTrainingArguments) -> None:
    """Refuse a run whose batch is larger than its data (with ``dataloader_drop_last`` it would train 0 steps)."""
    per_device, size = training_args.per_device_train_batch_size, processes(training_args)
    batch = per_device * size
    per_process = f" ({per_device} per process × {size} processes)" if size > 1 else ""
    if training_args.dataloader_drop_last and num_rows < batch:
        raise RecipeArgumentError(
            f"the training set has {num_rows} images but one step takes {batch}{per_process} and incomplete batches "
            f"are dropped, so no step would run: lower --per_device_train_batch_size to at most {num_rows // size} "
            "or train on more images"
        )
    accumulation = training_args.gradient_accumulation_steps
    if training_args.dataloader_drop_last and num_rows // batch < accumulation:
        raise RecipeArgumentError(
            f"an epoch of {num_rows} images holds {num_rows // batch} batches of {batch}, fewer than "
            f"--gradient_accumulation_steps {accumulation}, so no optimisation step would run: lower one of them"
        )


def run_settings(trainer: Any) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote a checkpoint, as written to ``run_settings.json``."""
    args = trainer.args
    return {
        "objective": trainer.objective.get_config_dict(),
        "batch_size": objective_batch_size(args),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "processes": processes(args),
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_rows": len(trainer.train_dataset),
        "seed": args.seed,
    }


def _previous_checkpoint_hint(checkpoint: str) -> str:
    folder = os.path.dirname(os.path.abspath(checkpoint))
    earlier = [path for path in checkpoints_in(folder) if os.path.abspath(path) != os.path.abspath(checkpoint)]
    step = _step(checkpoint)
    earlier = [path for path in earlier if step is None or (_step(path) or 0) < step]
    if earlier:
        return f"resume from the previous checkpoint instead: --resume_from_checkpoint {earlier[-1]}"
    return "no earlier checkpoint exists: start over in a new --output_dir"


def _step(checkpoint: str) -> int | None:
    match = re.search(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)$", os.path.normpath(checkpoint))
    return int(match.group(1)) if match else None


def _read_per_sample_state(path: str, checkpoint: str) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a per-sample state file, every tensor read once (a truncated file fails here)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return {name: tuple(handle.get_tensor(name).shape) for name in handle.keys()}
    except Exception as error:  # SafetensorError, OSError: a damaged or truncated file
        reason = " ".join(str(error).split()) or type(error).__name__
        raise RecipeArgumentError(
            f"{path} cannot be read ({type(error).__name__}: {reason}); the file is damaged (an interrupted save?): "
            f"{_previous_checkpoint_hint(checkpoint)}"
        ) from None


def check_resume_compatible(trainer: Any, checkpoint: str) -> None:
    """Refuse to resume ``checkpoint`` with another objective, dataset size or batch size, or from a damaged
    per-sample state file — before the untrained probes, with the flag that fixes it."""
    current = run_settings(trainer)
    settings_path = os.path.join(checkpoint, RUN_SETTINGS_NAME)
    saved: dict[str, Any] = {}
    if os.path.isfile(settings_path):
        with open(settings_path) as handle:
            saved = json.load(handle)
    else:  # a checkpoint written without the recipe: transformers' per-device batch size
        state_path = os.path.join(checkpoint, "trainer_state.json")
        if os.path.isfile(state_path):
            with open(state_path) as handle:
                batch = json.load(handle).get("train_batch_size")
            if batch is not None:
                saved = {"per_device_train_batch_size": batch}
    where = f"{checkpoint} was written"
    old_objective = saved.get("objective", {})
    if old_objective and old_objective.get("objective") != current["objective"].get("objective"):
        raise RecipeArgumentError(
            f"{where} by --objective {old_objective.get('objective')}, this run has --objective "
            f"{current['objective'].get('objective')}: resume with --objective {old_objective.get('objective')}, or "
            "start over in a new --output_dir"
        )
    if old_objective:
        differences = ", ".join(
            f"{key} {old_objective.get(key)!r} → {current['objective'].get(key)!r}"
            for key in sorted(set(old_objective) & set(current["objective"]))
            if old_objective.get(key) != current["objective"].get(key)
        )
        if differences:
            raise RecipeArgumentError(
                f"{where} with other objective settings ({differences}): resume with the settings it was written "
                "with, or start over in a new --output_dir"
            )
    if "train_rows" in saved and saved["train_rows"] != current["train_rows"]:
        raise RecipeArgumentError(
            f"{where} for a training set of {saved['train_rows']} images, this run has {current['train_rows']}: the "
            "per-sample state is keyed by dataset index, so resume on the same data (same --dataset_name, "
            "--train_split and --max_train_samples), or start over in a new --output_dir"
        )
    if "batch_size" in saved and saved["batch_size"] != current["batch_size"]:
        raise RecipeArgumentError(
            f"{where} with a batch of {saved['batch_size']} images per step ({saved['per_device_train_batch_size']} "
            f"per process × {saved['processes']}), this run has {current['batch_size']}: a resumed run continues "
            "exactly only with the same batch (data order, proposals and negatives depend on it); resume with "
            f"--per_device_train_batch_size {saved['per_device_train_batch_size']} on {saved['processes']} "
            "process(es), or start over in a new --output_dir"
        )
    if (
        "batch_size" not in saved
        and saved.get("per_device_train_batch_size", current["per_device_train_batch_size"])
        != (current["per_device_train_batch_size"])
    ):
        raise RecipeArgumentError(
            f"{where} with --per_device_train_batch_size {saved['per_device_train_batch_size']}, this run has "
            f"{current['per_device_train_batch_size']}: a resumed run continues exactly only with the same batch; "
            f"resume with --per_device_train_batch_size {saved['per_device_train_batch_size']}, or start over in a "
            "new --output_dir"
        )
    if (
        "gradient_accumulation_steps" in saved
        and saved["gradient_accumulation_steps"] != (current["gradient_accumulation_steps"])
    ):
        raise RecipeArgumentError(
            f"{where} with --gradient_accumulation_steps {saved['gradient_accumulation_steps']}, this run has "
            f"{current['gradient_accumulation_steps']}: resume with the value it was written with"
        )
    expected = {name: tuple(buffer.shape) for name, buffer in trainer.objective.named_buffers()}
    state_path = os.path.join(checkpoint, PER_SAMPLE_STATE_NAME)
    if not os.path.isfile(state_path):
        if expected:
            raise RecipeArgumentError(
                f"{checkpoint} holds no {PER_SAMPLE_STATE_NAME}, which --objective {trainer.objective.name} needs: it "
                "was written by another objective or without the recipe; resume with the objective that wrote it"
            )
        return
    stored = _read_per_sample_state(state_path, checkpoint)
    if set(stored) != set(expected):
        raise RecipeArgumentError(
            f"{state_path} holds per-sample state {sorted(stored)} but --objective {trainer.objective.name} keeps "
            f"{sorted(expected) or 'none'}: the checkpoint was written with another objective; resume with that one"
        )
    for name, shape in expected.items():
        if stored[name] != shape:
            raise RecipeArgumentError(
                f"{state_path}: {name!r} has {stored[name][0] if stored[name] else 0} entries but the training set "
                f"has {shape[0] if shape else 0} images: a checkpoint resumes only on the training set it was "
                "written for"
            )
