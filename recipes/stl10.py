"""Pre-train a timm ResNet with EMC² (or SogCLR / SimCLR) and report linear-probe and 1-NN accuracy.

Offline on scikit-learn's bundled digits (8×8 digits upscaled to 32 px; about a minute on a laptop CPU):

    python recipes/stl10.py --dataset_name digits --objective emc2 --output_dir runs/digits-emc2 \
        --per_device_train_batch_size 32 --max_steps 200 --report_to none

STL-10 from the Hub or a local copy (a GPU job; paper settings for b = 32: β = 14.28, lr 1e-4):

    accelerate launch recipes/stl10.py --dataset_name tanganke/stl10 --output_dir runs/stl10-emc2 \
        --per_device_train_batch_size 32 --inverse_temperature 14.28 --learning_rate 1e-4 --num_train_epochs 100

Writes the encoder (``from_pretrained(output_dir)``), its timm/transformers export with a model card
(``output_dir/export``; ``--push_to_hub --hub_model_id user/name`` uploads it), ``eval_results.json`` with the
probe accuracies of the trained encoder (and of the untrained one, prefixed ``untrained_``), and checkpoints that carry
the per-sample state.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import datasets
from transformers import HfArgumentParser, set_seed

from emc2_hf import (
    ContrastiveCollator,
    ContrastiveEncoder,
    ContrastiveEncoderConfig,
    ContrastiveTrainer,
    ContrastiveTrainingArguments,
    ModelCardData,
    ProbeEvaluator,
    SimCLRAugmentation,
    load_digits_dataset,
)

logger = logging.getLogger("emc2_hf.recipes.stl10")

DIGITS = "digits"


@dataclass
class DataArguments:
    """Where the images come from and how they are augmented."""

    dataset_name: str = field(
        default=DIGITS,
        metadata={"help": "'digits' (scikit-learn's bundled digits, offline), a Hub dataset name, or a local folder."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_split: str = field(default="train", metadata={"help": "Split(s) to pre-train on, e.g. 'unlabeled+train'."})
    probe_train_split: str = field(default="train", metadata={"help": "Labelled split the probes are fitted on."})
    eval_split: str = field(default="test", metadata={"help": "Labelled split the probe accuracy is measured on."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels (probes only)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Pre-train on the first N rows only."})
    image_size: int | None = field(
        default=None, metadata={"help": "Crop size (default: 32 for digits, 96 otherwise)."}
    )
    crop_scale_min: float | None = field(
        default=None, metadata={"help": "Smallest random-resized-crop area fraction (default: 0.5 digits, 0.08)."}
    )
    color_jitter_strength: float = field(default=1.0, metadata={"help": "s in ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)."})
    blur_probability: float | None = field(
        default=None, metadata={"help": "Probability of a Gaussian blur (default: 0 for digits, 0.5 otherwise)."}
    )
    horizontal_flip_probability: float | None = field(
        default=None, metadata={"help": "Horizontal flip probability (default: 0 for digits, 0.5 otherwise)."}
    )
    shots_per_class: int = field(default=5, metadata={"help": "Labelled examples per class for the few-shot probes."})


@dataclass
class ModelArguments:
    """The encoder."""

    backbone: str = field(default="resnet18", metadata={"help": "timm architecture of the backbone."})
    pretrained_backbone: bool = field(default=False, metadata={"help": "Start from timm's pretrained weights."})
    projection_dim: int | None = field(default=128, metadata={"help": "Projection head output size (None: no head)."})


def load_splits(data_args: DataArguments, seed: int) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
    """Return (pre-training set, probe-fitting set, probe-evaluation set)."""
    if data_args.dataset_name == DIGITS:
        splits = load_digits_dataset(image_size=data_args.image_size or 32, seed=seed)
        train, probe_train, evaluation = splits["train"], splits["train"], splits["test"]
    else:
        try:
            train = datasets.load_dataset(
                data_args.dataset_name, data_args.dataset_config_name, split=data_args.train_split
            )
            probe_train = datasets.load_dataset(
                data_args.dataset_name, data_args.dataset_config_name, split=data_args.probe_train_split
            )
            evaluation = datasets.load_dataset(
                data_args.dataset_name, data_args.dataset_config_name, split=data_args.eval_split
            )
        except (ConnectionError, OSError, FileNotFoundError, ValueError) as error:
            raise SystemExit(
                f"Could not load dataset {data_args.dataset_name!r} ({type(error).__name__}: {error}).\n"
                "Without network, point --dataset_name at a local copy (a folder of parquet files or an imagefolder "
                "saved with `datasets`), or use --dataset_name digits for the offline demo."
            ) from error
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    return train, probe_train, evaluation


def build_augmentation(data_args: DataArguments) -> SimCLRAugmentation:
    digits = data_args.dataset_name == DIGITS
    strength = data_args.color_jitter_strength
    return SimCLRAugmentation(
        image_size=data_args.image_size or (32 if digits else 96),
        crop_scale=(data_args.crop_scale_min or (0.5 if digits else 0.08), 1.0),
        horizontal_flip_probability=(
            data_args.horizontal_flip_probability
            if data_args.horizontal_flip_probability is not None
            else (0.0 if digits else 0.5)
        ),
        brightness=0.8 * strength,
        contrast=0.8 * strength,
        saturation=0.8 * strength,
        hue=min(0.2 * strength, 0.5),
        blur_probability=(
            data_args.blur_probability if data_args.blur_probability is not None else (0.0 if digits else 0.5)
        ),
    )


def format_probes(metrics: dict[str, float], prefix: str) -> str:
    names = ["linear_probe_accuracy", "knn_accuracy", "fewshot_linear_probe_accuracy", "fewshot_knn_accuracy"]
    return ", ".join(f"{name.replace('_accuracy', '')}={metrics[f'{prefix}_{name}']:.4f}" for name in names)


def main(args: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((DataArguments, ModelArguments, ContrastiveTrainingArguments))
    if args is None and len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
        parse = parser.parse_yaml_file if sys.argv[1].endswith((".yaml", ".yml")) else parser.parse_json_file
        data_args, model_args, training_args = parse(os.path.abspath(sys.argv[1]))
    else:
        data_args, model_args, training_args = parser.parse_args_into_dataclasses(args=args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    datasets.utils.logging.disable_progress_bar()

    train, probe_train, evaluation = load_splits(data_args, training_args.seed)
    collator = ContrastiveCollator(augmentation=build_augmentation(data_args), image_column=data_args.image_column)
    probe_evaluator = ProbeEvaluator(
        train_dataset=probe_train,
        test_dataset=evaluation,
        pixel_values_fn=collator.eval_pixel_values,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        shots_per_class=data_args.shots_per_class,
        batch_size=max(training_args.per_device_eval_batch_size, 256),
        seed=training_args.seed,
    )
    set_seed(training_args.seed)  # the encoder's initialisation is part of the run
    model = ContrastiveEncoder(
        ContrastiveEncoderConfig(
            backbone=model_args.backbone,
            pretrained_backbone=model_args.pretrained_backbone,
            projection_dim=model_args.projection_dim,
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
        model_card_data=card_data,
    )
    logger.info(
        "Pre-training %s (%.1fM parameters) with %s on %d images of %r; probes fitted on %d and measured on %d images",
        model_args.backbone,
        sum(p.numel() for p in model.parameters()) / 1e6,
        trainer.objective,
        len(train),
        data_args.dataset_name,
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
        "train_loss": train_result.training_loss,
        "global_step": trainer.state.global_step,
    }
    if trainer.is_world_process_zero():
        trainer.save_metrics("eval", results)
        with open(os.path.join(training_args.output_dir, "run_config.json"), "w") as handle:
            json.dump(
                {"objective": trainer.objective.get_config_dict(), "data": vars(data_args), "model": vars(model_args)},
                handle,
                indent=2,
                default=str,
            )
    return results


if __name__ == "__main__":
    main()
