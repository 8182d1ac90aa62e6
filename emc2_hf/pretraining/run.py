"""The pre-training pipeline behind the recipes: check → load → augment → train with probes → export → plot → push.

Everything that can be checked without the data or the model is checked first (:mod:`.checks`), so a bad flag costs
seconds, not the untrained probes; each failure is one line and exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import transformers
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.augmentations import SimCLRAugmentation
from ..data.collator import ContrastiveCollator
from ..data.digits import load_digits_dataset
from ..data.imagenet100 import select_imagenet100
from ..data.images import UndecodableImageError, find_undecodable_images
from ..data.sources import DatasetUnavailableError, load_image_split, looks_like_local_path, require_column
from ..evaluation.probes import ProbeEvaluator
from ..hub.model_card import ModelCardData
from ..modeling import ContrastiveEncoder, ContrastiveEncoderConfig
from ..training.arguments import ContrastiveTrainingArguments
from ..training.distributed import shutdown_process_group
from ..training.trainer import ContrastiveTrainer
from .arguments import DIGITS, DataArguments, ModelArguments
from .checks import (
    RUN_SETTINGS_NAME,
    RecipeArgumentError,
    check_batch_fits_data,
    check_launch,
    check_objective_batch_size,
    check_objective_settings,
    check_resume_compatible,
    objective_batch_size,
    resolve_resume_checkpoint,
    run_settings,
)
from .config import is_main_process_from_environment, parse_recipe_arguments
from .plots import plot_training_curves

logger = logging.getLogger("emc2_hf.pretraining")

PROBE_NAMES = ("linear_probe_accuracy", "knn_accuracy", "fewshot_linear_probe_accuracy", "fewshot_knn_accuracy")
DIGITS_DESCRIPTION = "scikit-learn digits"


class HubPushError(RuntimeError):
    """The push to the Hub failed after the export was written; the message says how to push that folder later."""


def random_rows(dataset: datasets.Dataset, count: int | None, seed: int) -> datasets.Dataset:
    """A seeded random ``count`` rows in dataset order (all rows when ``count`` is None or too large)."""
    if count is None or count >= len(dataset):
        return dataset
    if count < 1:
        raise ValueError(f"a row limit must be >= 1, got {count}")
    rows = np.sort(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False))
    return dataset.select(rows)


def holdout_rows(num_rows: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held_out)`` sorted row positions: a seeded random ``fraction`` of ``num_rows`` held out (at least 1,
    at most ``num_rows − 1``)."""
    count = min(max(1, round(fraction * num_rows)), num_rows - 1)
    if count < 1:
        raise DatasetUnavailableError(f"--eval_holdout_fraction needs at least 2 labelled rows, got {num_rows}")
    held_out = np.sort(np.random.default_rng([seed, 0xE5A1]).choice(num_rows, size=count, replace=False))
    return np.setdiff1d(np.arange(num_rows), held_out), held_out


def _split_parts(split: str) -> list[str]:
    return [part.strip() for part in split.split("+")]


def load_splits(
    data_args: DataArguments, seed: int, default_select_imagenet100: bool = False
) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
    """``(pre-training set, probe-fitting set, probe-evaluation set)`` as ``data_args`` describe them.

    Every split named is loaded, or the load fails naming it: data without splits is one split, ``train``, and a
    missing ``--eval_split`` is an error. With ``--eval_holdout_fraction f``, the evaluation rows are a seeded
    fraction ``f`` of ``--probe_train_split`` instead, removed from the probe-fitting rows and from pre-training
    (where the pre-training splits include that split).
    """
    if data_args.dataset_name == DIGITS:
        digits = load_digits_dataset(image_size=data_args.image_size or 32, seed=seed)

        def load(split: str) -> datasets.Dataset:
            missing = [part for part in _split_parts(split) if part not in digits]
            if missing:
                raise DatasetUnavailableError(
                    f"the digits data has no split {missing[0]!r}; its splits are {list(digits)}. Pass one of them "
                    "(--train_split / --probe_train_split / --eval_split), or --eval_holdout_fraction"
                )
            parts = [digits[part] for part in _split_parts(split)]
            return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    else:

        def load(split: str) -> datasets.Dataset:
            return load_image_split(
                data_args.dataset_name,
                split,
                config_name=data_args.dataset_config_name,
                data_dir=data_args.data_dir,
                cache_dir=data_args.dataset_cache_dir,
                image_column=data_args.image_column,
            )

    probe_train = load(data_args.probe_train_split)
    require_column(
        probe_train, data_args.label_column, f"the labelled split {data_args.probe_train_split!r}", "--label_column"
    )
    if data_args.eval_holdout_fraction is None:
        train = load(data_args.train_split)
        evaluation = load(data_args.eval_split)
        where = f"the labelled split {data_args.eval_split!r}"
        require_column(evaluation, data_args.label_column, where, "--label_column")
    else:
        kept, held_out = holdout_rows(len(probe_train), data_args.eval_holdout_fraction, seed)
        evaluation = probe_train.select(held_out)
        parts = [
            probe_train.select(kept) if part == data_args.probe_train_split else load(part)
            for part in _split_parts(data_args.train_split)
        ]
        train = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        probe_train = probe_train.select(kept)
        logger.info("Evaluation: %s", holdout_description(data_args, len(evaluation), seed))
    select = data_args.select_imagenet100
    if select is None:
        select = default_select_imagenet100 and _num_classes(evaluation, data_args.label_column) > 100
    if select:
        try:
            probe_train, evaluation = (
                select_imagenet100(d, data_args.label_column) for d in (probe_train, evaluation)
            )
            if data_args.label_column in train.column_names:
                train = select_imagenet100(train, data_args.label_column)
        except ValueError as error:
            raise DatasetUnavailableError(f"--select_imagenet100: {error}") from error
        logger.info(
            "Selected the ImageNet-100 classes: %d training and %d evaluation images", len(train), len(evaluation)
        )
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    probe_train = random_rows(probe_train, data_args.max_probe_train_samples, seed)
    evaluation = random_rows(evaluation, data_args.max_eval_samples, seed + 1)
    return train, probe_train, evaluation


def holdout_description(data_args: DataArguments, num_rows: int, seed: int) -> str:
    """How the model card and the log name a ``--eval_holdout_fraction`` evaluation set."""
    shared = data_args.probe_train_split in _split_parts(data_args.train_split)
    pretraining = " and from pre-training" if shared else ""
    return (
        f"a seeded {data_args.eval_holdout_fraction:.0%} hold-out of `{data_args.probe_train_split}` ({num_rows} "
        f"images, seed {seed}; left out of the probes' fitting{pretraining})"
    )


def _num_classes(dataset: datasets.Dataset, label_column: str) -> int:
    feature = dataset.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return len(set(dataset[label_column]))


def drop_undecodable_images(dataset: datasets.Dataset, image_column: str, source: str) -> datasets.Dataset:
    """``dataset`` without the rows whose image cannot be decoded; logs how many were dropped and the first files."""
    failures = find_undecodable_images(dataset, image_column, source)
    if not failures:
        return dataset
    shown = "; ".join(description for _, description in failures[:3]) + ("; ..." if len(failures) > 3 else "")
    logger.warning("Skipped %d undecodable image(s) of %s: %s", len(failures), source, shown)
    dropped = {row for row, _ in failures}
    return dataset.select([row for row in range(len(dataset)) if row not in dropped])


def build_augmentation(data_args: DataArguments, default_preset: str) -> SimCLRAugmentation:
    """The preset named by ``--augmentation`` (or the dataset's default) with the explicit overrides applied."""
    preset = data_args.augmentation or (DIGITS if data_args.dataset_name == DIGITS else default_preset)
    augmentation = SimCLRAugmentation.from_preset(preset)
    overrides: dict[str, Any] = {
        "image_size": data_args.image_size,
        "blur_probability": data_args.blur_probability,
        "horizontal_flip_probability": data_args.horizontal_flip_probability,
    }
    if data_args.crop_scale_min is not None:
        overrides["crop_scale"] = (data_args.crop_scale_min, 1.0)
    if data_args.color_jitter_strength != 1.0:
        strength = data_args.color_jitter_strength
        overrides.update(
            brightness=augmentation.brightness * strength,
            contrast=augmentation.contrast * strength,
            saturation=augmentation.saturation * strength,
            hue=min(augmentation.hue * strength, 0.5),
        )
    return dataclasses.replace(augmentation, **{name: value for name, value in overrides.items() if value is not None})


def model_card_data(data_args: DataArguments, num_eval_rows: int, seed: int) -> ModelCardData:
    """What the card says about the data: Hub ids go to its ``datasets`` metadata, local data is described in words
    (by folder name, not its absolute path), and a hold-out is named as such."""
    name = data_args.dataset_name
    if name == DIGITS:
        description, hub_id = DIGITS_DESCRIPTION, None
    elif os.path.exists(os.path.expanduser(name)) or looks_like_local_path(name):
        description, hub_id = f"local data `{os.path.basename(os.path.normpath(name))}`", None
    else:
        description, hub_id = name, name
    holdout = data_args.eval_holdout_fraction is not None
    return ModelCardData(
        dataset_name=description,
        hub_dataset_id=hub_id,
        train_split=data_args.train_split,
        probe_train_split=data_args.probe_train_split,
        eval_split=f"{data_args.probe_train_split} (held out)" if holdout else data_args.eval_split,
        eval_split_description=holdout_description(data_args, num_eval_rows, seed) if holdout else None,
    )


def format_probes(metrics: dict[str, float], prefix: str) -> str:
    return ", ".join(f"{name.replace('_accuracy', '')}={metrics[f'{prefix}_{name}']:.4f}" for name in PROBE_NAMES)


class RunSettingsCallback(TrainerCallback):
    """Writes ``run_settings.json`` (objective, batch, processes, dataset size, seed) into every checkpoint, so that a
    resumed run can be checked against the run that wrote it before any expensive work."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            with open(os.path.join(folder, RUN_SETTINGS_NAME), "w") as handle:
                json.dump(self.settings, handle, indent=2, default=str)
        return control


def run_pretraining(
    data_args: DataArguments,
    model_args: ModelArguments,
    training_args: ContrastiveTrainingArguments,
    default_augmentation: str = "stl10",
    default_select_imagenet100: bool = False,
) -> dict[str, float]:
    """Pre-train, measure the probes before and after, save, export, plot (and push), and return the metrics.

    Writes to ``output_dir``: the encoder (``from_pretrained``), ``export/`` (timm/transformers folder with a model
    card), ``eval_results.json`` (probe accuracies of the trained and of the untrained encoder, ``untrained_*``,
    and timings), ``run_config.json``, ``training_curves.png`` / ``.json``, and checkpoints carrying the per-sample
    state (and ``run_settings.json``). Only the main process writes.

    Raises:
        RecipeArgumentError: a flag or combination that cannot work, found before the untrained probes.
        DatasetUnavailableError: a dataset or split that cannot be loaded.
        HubPushError: ``--push_to_hub`` failed (after everything else was written).
    """
    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars cut into the Trainer's own
    check_launch(training_args)
    resume_checkpoint = resolve_resume_checkpoint(training_args)
    check_objective_settings(training_args)

    train, probe_train, evaluation = load_splits(data_args, training_args.seed, default_select_imagenet100)
    if data_args.skip_undecodable_images:
        train, probe_train, evaluation = (
            drop_undecodable_images(dataset, data_args.image_column, f"the {role} split {split!r}")
            for dataset, role, split in (
                (train, "pre-training", data_args.train_split),
                (probe_train, "probe-fitting", data_args.probe_train_split),
                (evaluation, "evaluation", data_args.eval_split),
            )
        )
    check_batch_fits_data(len(train), training_args)
    augmentation = build_augmentation(data_args, default_augmentation)
    collator = ContrastiveCollator(
        augmentation=augmentation, image_column=data_args.image_column, num_augmentations=data_args.num_augmentations
    )
    card_data = model_card_data(data_args, len(evaluation), training_args.seed)
    evaluation_name = card_data.eval_split_description or f"the evaluation split {data_args.eval_split!r}"

    def evaluator(fit: datasets.Dataset, measure: datasets.Dataset) -> ProbeEvaluator:
        return ProbeEvaluator(
            train_dataset=fit,
            test_dataset=measure,
            pixel_values_fn=collator.eval_pixel_values,
            image_column=data_args.image_column,
            label_column=data_args.label_column,
            shots_per_class=data_args.shots_per_class,
            num_draws=data_args.few_shot_draws,
            batch_size=max(training_args.per_device_eval_batch_size, 256),
            seed=training_args.seed,
            train_name=f"the probe-fitting split {data_args.probe_train_split!r}",
            test_name=evaluation_name,
        )

    probe_evaluator = evaluator(probe_train, evaluation)
    try:
        probe_evaluator.check_few_shot()
    except ValueError as error:
        raise RecipeArgumentError(
            f"{error}: lower --shots_per_class, or raise --max_probe_train_samples (or drop it)"
        ) from None
    monitor_evaluator = None
    if training_args.knn_monitor_steps is not None:
        limit = data_args.knn_monitor_max_samples
        monitor_evaluator = evaluator(
            random_rows(probe_train, limit, training_args.seed + 2),
            random_rows(evaluation, limit, training_args.seed + 3),
        )
    set_seed(training_args.seed)  # the encoder's initialisation is part of the run
    model = ContrastiveEncoder(
        ContrastiveEncoderConfig(
            backbone=model_args.backbone,
            pretrained_backbone=model_args.pretrained_backbone,
            projection_dim=model_args.projection_dim,
            projection_hidden_dim=model_args.projection_hidden_dim,
            projection_batch_norm=model_args.projection_batch_norm,
            backbone_kwargs=model_args.backbone_kwargs,
        )
    )
    # The push happens at the end, after everything is written (Trainer.__init__ would contact the Hub first).
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    try:
        trainer = ContrastiveTrainer(
            model=model,
            args=training_args,
            train_dataset=train,
            data_collator=collator,
            probe_evaluator=probe_evaluator,
            monitor_evaluator=monitor_evaluator,
            model_card_data=card_data,
        )
    except ValueError as error:
        raise RecipeArgumentError(str(error)) from None
    check_objective_batch_size(trainer.objective, objective_batch_size(training_args))
    if resume_checkpoint is not None:
        check_resume_compatible(trainer, resume_checkpoint)
    trainer.add_callback(RunSettingsCallback(run_settings(trainer)))
    logger.info(
        "Pre-training %s (%.1fM parameters) with %s on %d images of %r at %d px, %d images per step%s; probes fitted "
        "on %d and measured on %d images%s",
        model_args.backbone,
        sum(p.numel() for p in model.parameters()) / 1e6,
        json.dumps(trainer.objective.get_config_dict(), default=str),
        len(train),
        data_args.dataset_name,
        augmentation.image_size,
        objective_batch_size(training_args),
        f" over {training_args.world_size} processes" if training_args.world_size > 1 else "",
        len(probe_train),
        len(evaluation),
        f"; resuming {resume_checkpoint}" if resume_checkpoint else "",
    )

    untrained = trainer.evaluate(metric_key_prefix="untrained")
    card_data.untrained_metrics = untrained
    logger.info("Probe accuracy before training: %s", format_probes(untrained, "untrained"))
    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resume_checkpoint)
    train_seconds = time.perf_counter() - start
    # The probes already ran at the last step (ProbeCallback); evaluate again only if they did not.
    if trainer.last_evaluation is not None and trainer.last_evaluation[:2] == (trainer.state.global_step, "eval"):
        trained = trainer.last_evaluation[2]
    else:
        trained = trainer.evaluate()
    logger.info(
        "Probe accuracy after %d steps (%.0f s): %s",
        trainer.state.global_step,
        train_seconds,
        format_probes(trained, "eval"),
    )

    trainer.save_model(training_args.output_dir)
    export_dir = trainer.export()
    results = {
        **trained,
        **untrained,
        "train_runtime_seconds": round(train_seconds, 2),
        "train_samples_per_second": train_result.metrics.get("train_samples_per_second"),
        "train_loss": train_result.training_loss,
        "global_step": trainer.state.global_step,
    }
    if trainer.is_world_process_zero():
        logger.info("Encoder for timm / transformers (with its model card) written to %s", export_dir)
        trainer.save_metrics("eval", results)
        with open(os.path.join(training_args.output_dir, "run_config.json"), "w") as handle:
            json.dump(
                {
                    "objective": trainer.objective.get_config_dict(),
                    "data": vars(data_args),
                    "model": vars(model_args),
                    "augmentation": vars(augmentation),
                    "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
                },
                handle,
                indent=2,
                default=str,
            )
        batch = objective_batch_size(training_args)
        title = f"{trainer.objective.name} on {card_data.dataset_name}, {batch} images per step"
        written = plot_training_curves(trainer.state.log_history, training_args.output_dir, title=title)
        if written is not None:
            logger.info("Training curves: %s (numbers in %s)", *written)
    if push_to_hub:
        training_args.push_to_hub = True
        push_export(trainer, export_dir)
    return results


def push_export(trainer: ContrastiveTrainer, export_dir: str) -> None:
    """``trainer.push_to_hub()``; a failure becomes :class:`HubPushError` saying the export is written and how to
    push it later."""
    try:
        trainer.push_to_hub()
    except Exception as error:  # network, offline mode, authentication, permissions
        repo = trainer.hub_model_id or trainer.args.hub_model_id or "USER/NAME"
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        status = getattr(getattr(error, "response", None), "status_code", None)
        what = f"the Hub refused the push (HTTP {status})" if status else "the Hub is unreachable"
        raise HubPushError(
            f"Could not push to the Hub: {what} ({type(error).__name__}: {reason}). The export is written to "
            f"{export_dir} (with its model card); push it later with `hf upload {repo} {export_dir}` or "
            f"HfApi().upload_folder(repo_id={repo!r}, folder_path={export_dir!r})"
        ) from None
    if trainer.is_world_process_zero():
        logger.info("Pushed the export to the Hub as %s", trainer.hub_model_id)


def configure_logging() -> None:
    """One readable log: INFO on the main process; warnings and errors only, once, from the other processes."""
    main_process = is_main_process_from_environment()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if main_process else logging.ERROR
    )
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    if not main_process:  # every process would repeat the main process's warnings
        warnings.simplefilter("ignore")
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()


def _one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a DataLoader worker's re-raised error carries a whole traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    name = type(error).__name__
    return last.split(f"{name}: ", 1)[-1] if f"{name}: " in last else " ".join(lines)


def _exit(message: str, status: int, every_process: bool = False) -> SystemExit:
    """Print ``message`` to stderr (on the main process only, unless ``every_process``) and return the
    ``SystemExit(status)`` to raise."""
    if every_process or is_main_process_from_environment():
        print(message, file=sys.stderr)
    return SystemExit(status)


def _argument_error(prog: str, error: BaseException) -> SystemExit:
    """``<prog>: error: <message>`` on one line, status 2, as argparse reports a bad argument."""
    return _exit(f"{prog}: error: {' '.join(str(error).split())}", 2)


def main(
    args: Sequence[str] | None = None,
    defaults: dict[str, Any] | None = None,
    presets_dir: str | None = None,
    default_augmentation: str = "stl10",
    default_select_imagenet100: bool = False,
    prog: str | None = None,
    description: str | None = None,
) -> dict[str, float]:
    """Parse the arguments (see :func:`parse_recipe_arguments`) and :func:`run_pretraining`.

    A bad flag or combination ends the program with one line and status 2 (like an argument error); a dataset that
    cannot be loaded, an undecodable image or a failed push with the explanation and status 1; never a traceback.
    """
    prog = prog or os.path.basename(sys.argv[0])
    try:
        data_args, model_args, training_args = parse_recipe_arguments(args, defaults, presets_dir, prog, description)
    except (ValueError, FileNotFoundError) as error:
        raise _argument_error(prog, error) from None
    configure_logging()
    try:
        results = run_pretraining(
            data_args, model_args, training_args, default_augmentation, default_select_imagenet100
        )
    except RecipeArgumentError as error:
        raise _argument_error(prog, error) from None
    except DatasetUnavailableError as error:
        raise _exit(f"Could not load dataset {data_args.dataset_name!r}: {error}", 1) from None
    except UndecodableImageError as error:  # found by one process's DataLoader: every process says which image
        raise _exit(_one_line(error), 1, every_process=True) from None
    except HubPushError as error:
        raise _exit(str(error), 1) from None
    shutdown_process_group()
    return results
