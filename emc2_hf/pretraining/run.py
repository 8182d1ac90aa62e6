"""The pre-training pipeline behind the recipes: load → augment → train with probes → export → report."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
from transformers import set_seed

from ..data.augmentations import SimCLRAugmentation
from ..data.collator import ContrastiveCollator
from ..data.digits import load_digits_dataset
from ..data.imagenet100 import select_imagenet100
from ..data.sources import DatasetUnavailableError, load_image_split, require_column
from ..evaluation.probes import ProbeEvaluator
from ..hub.model_card import ModelCardData
from ..modeling import ContrastiveEncoder, ContrastiveEncoderConfig
from ..training.arguments import ContrastiveTrainingArguments
from ..training.trainer import ContrastiveTrainer
from .arguments import DIGITS, DataArguments, ModelArguments
from .config import parse_recipe_arguments

logger = logging.getLogger("emc2_hf.pretraining")

PROBE_NAMES = ("linear_probe_accuracy", "knn_accuracy", "fewshot_linear_probe_accuracy", "fewshot_knn_accuracy")


def random_rows(dataset: datasets.Dataset, count: int | None, seed: int) -> datasets.Dataset:
    """A seeded random ``count`` rows in dataset order (all rows when ``count`` is None or too large)."""
    if count is None or count >= len(dataset):
        return dataset
    if count < 1:
        raise ValueError(f"a row limit must be >= 1, got {count}")
    rows = np.sort(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False))
    return dataset.select(rows)


def load_splits(
    data_args: DataArguments, seed: int, default_select_imagenet100: bool = False
) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
    """``(pre-training set, probe-fitting set, probe-evaluation set)`` as ``data_args`` describe them."""
    if data_args.dataset_name == DIGITS:
        splits = load_digits_dataset(image_size=data_args.image_size or 32, seed=seed)
        train, probe_train, evaluation = splits["train"], splits["train"], splits["test"]
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

        train, probe_train, evaluation = (
            load(split) for split in (data_args.train_split, data_args.probe_train_split, data_args.eval_split)
        )
    for split, dataset in ((data_args.probe_train_split, probe_train), (data_args.eval_split, evaluation)):
        require_column(dataset, data_args.label_column, f"the labelled split {split!r}", "--label_column")
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


def _num_classes(dataset: datasets.Dataset, label_column: str) -> int:
    feature = dataset.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return len(set(dataset[label_column]))


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


def format_probes(metrics: dict[str, float], prefix: str) -> str:
    return ", ".join(f"{name.replace('_accuracy', '')}={metrics[f'{prefix}_{name}']:.4f}" for name in PROBE_NAMES)


def run_pretraining(
    data_args: DataArguments,
    model_args: ModelArguments,
    training_args: ContrastiveTrainingArguments,
    default_augmentation: str = "stl10",
    default_select_imagenet100: bool = False,
) -> dict[str, float]:
    """Pre-train, measure the probes before and after, save, export (and push), and return the metrics.

    Writes to ``output_dir``: the encoder (``from_pretrained``), ``export/`` (timm/transformers folder with a model
    card), ``eval_results.json`` (probe accuracies of the trained and of the untrained encoder, ``untrained_*``,
    and timings), ``run_config.json``, and checkpoints carrying the per-sample state.
    """
    datasets.utils.logging.disable_progress_bar()
    train, probe_train, evaluation = load_splits(data_args, training_args.seed, default_select_imagenet100)
    augmentation = build_augmentation(data_args, default_augmentation)
    collator = ContrastiveCollator(
        augmentation=augmentation, image_column=data_args.image_column, num_augmentations=data_args.num_augmentations
    )

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
        )

    probe_evaluator = evaluator(probe_train, evaluation)
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
    card_data = ModelCardData(
        dataset_name="scikit-learn digits" if data_args.dataset_name == DIGITS else data_args.dataset_name,
        train_split=data_args.train_split,
        probe_train_split=data_args.probe_train_split,
        eval_split=data_args.eval_split,
    )
    trainer = ContrastiveTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=collator,
        probe_evaluator=probe_evaluator,
        monitor_evaluator=monitor_evaluator,
        model_card_data=card_data,
    )
    logger.info(
        "Pre-training %s (%.1fM parameters) with %s on %d images of %r at %d px; probes fitted on %d and measured on "
        "%d images",
        model_args.backbone,
        sum(p.numel() for p in model.parameters()) / 1e6,
        trainer.objective,
        len(train),
        data_args.dataset_name,
        augmentation.image_size,
        len(probe_train),
        len(evaluation),
    )

    untrained = trainer.evaluate(metric_key_prefix="untrained")
    logger.info("Probe accuracy before training: %s", format_probes(untrained, "untrained"))
    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
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

    # With --push_to_hub, save_model also uploads the export (ContrastiveTrainer.push_to_hub), never a checkpoint.
    trainer.save_model(training_args.output_dir)
    export_dir = trainer.export()
    logger.info("Encoder for timm / transformers (with its model card) written to %s", export_dir)
    if training_args.push_to_hub:
        logger.info("Pushed the export to the Hub as %s", trainer.hub_model_id)
    results = {
        **trained,
        **untrained,
        "train_runtime_seconds": round(train_seconds, 2),
        "train_samples_per_second": train_result.metrics.get("train_samples_per_second"),
        "train_loss": train_result.training_loss,
        "global_step": trainer.state.global_step,
    }
    if trainer.is_world_process_zero():
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
    return results


def main(
    args: Sequence[str] | None = None,
    defaults: dict[str, Any] | None = None,
    presets_dir: str | None = None,
    default_augmentation: str = "stl10",
    default_select_imagenet100: bool = False,
) -> dict[str, float]:
    """Parse the arguments (see :func:`parse_recipe_arguments`) and :func:`run_pretraining`; a dataset that cannot
    be loaded ends the program with the loader's explanation instead of a traceback."""
    data_args, model_args, training_args = parse_recipe_arguments(args, defaults, presets_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        return run_pretraining(data_args, model_args, training_args, default_augmentation, default_select_imagenet100)
    except DatasetUnavailableError as error:
        raise SystemExit(f"Could not load dataset {data_args.dataset_name!r}: {error}") from None
