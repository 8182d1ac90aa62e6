"""The recipes' data and model arguments (parsed with ``HfArgumentParser`` beside ``ContrastiveTrainingArguments``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..data.augmentations import AUGMENTATION_PRESETS

DIGITS = "digits"


@dataclass
class DataArguments:
    """Where the images come from, which splits play which role, and how views are augmented."""

    _argument_group_name = "data"  # HfArgumentParser's --help group

    dataset_name: str = field(
        default=DIGITS,
        metadata={
            "help": "'digits' (scikit-learn's bundled digits, offline), a Hub dataset ('jxie/stl10', "
            "'clane9/imagenet-100', 'ILSVRC/imagenet-1k'), or a local copy: a save_to_disk folder, a folder of "
            "parquet files, or an imagefolder (DIR/<split>/<class>/<image>)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    data_dir: str | None = field(default=None, metadata={"help": "data_dir passed to datasets.load_dataset."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "Where datasets caches downloads."})
    train_split: str = field(
        default="train", metadata={"help": "Split(s) to pre-train on; join with '+', e.g. 'unlabeled+train'."}
    )
    probe_train_split: str = field(default="train", metadata={"help": "Labelled split the probes are fitted on."})
    eval_split: str = field(default="test", metadata={"help": "Labelled split the probe accuracy is measured on."})
    eval_holdout_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Measure the probes on a seeded random fraction of --probe_train_split instead of --eval_split "
            "(for data with a single split, e.g. one parquet file): those rows are removed from the probe-fitting "
            "rows and from pre-training, and the model card names the hold-out. Default: use --eval_split."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels (probes only)."})
    select_imagenet100: bool | None = field(
        default=None,
        metadata={
            "help": "Keep only ImageNet-100's 100 classes (needs ImageNet-1k labels or WordNet-id class folders). "
            "Default: only the imagenet100 recipe does, when the labelled data has more than 100 classes."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Pre-train on the first N rows only."})
    skip_undecodable_images: bool = field(
        default=False,
        metadata={
            "help": "Decode every image of every split once before training and drop the rows that fail (their "
            "count and first files are logged). Default: an undecodable image stops the run, naming its file."
        },
    )
    max_probe_train_samples: int | None = field(
        default=None, metadata={"help": "Fit the probes on a seeded random N rows of the probe split."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Measure the probes on a seeded random N rows of the eval split."}
    )
    knn_monitor_max_samples: int | None = field(
        default=5000,
        metadata={"help": "--knn_monitor_steps measures on a seeded random N rows of each labelled split."},
    )
    augmentation: str | None = field(
        default=None,
        metadata={
            "help": "Augmentation preset (default: 'digits' for digits, else the recipe's).",
            "choices": sorted(AUGMENTATION_PRESETS),
        },
    )
    image_size: int | None = field(default=None, metadata={"help": "Crop size (default: the preset's)."})
    crop_scale_min: float | None = field(
        default=None, metadata={"help": "Smallest random-resized-crop area fraction (default: the preset's)."}
    )
    color_jitter_strength: float = field(
        default=1.0, metadata={"help": "Multiplies the preset's colour-jitter strengths (SimCLR's s)."}
    )
    blur_probability: float | None = field(
        default=None, metadata={"help": "Probability of a Gaussian blur (default: the preset's)."}
    )
    horizontal_flip_probability: float | None = field(
        default=None, metadata={"help": "Horizontal flip probability (default: the preset's)."}
    )
    num_augmentations: int | None = field(
        default=None,
        metadata={
            "help": "Fixed augmentations per image (the paper's pre-computed |A|, e.g. 2); default: fresh views "
            "every epoch."
        },
    )
    shots_per_class: int = field(default=5, metadata={"help": "Labelled examples per class for the few-shot probes."})
    few_shot_draws: int = field(
        default=10, metadata={"help": "Random few-shot subsets the few-shot accuracies are averaged over."}
    )

    def __post_init__(self) -> None:
        """Refuse values that cannot work before any data is loaded (the recipes print one line and exit 2)."""
        for name in ("max_train_samples", "max_probe_train_samples", "max_eval_samples", "knn_monitor_max_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1 (or unset), got {value}")
        for name in ("image_size", "shots_per_class", "few_shot_draws"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if self.eval_holdout_fraction is not None and not 0 < self.eval_holdout_fraction < 1:
            raise ValueError(f"--eval_holdout_fraction must be in (0, 1), got {self.eval_holdout_fraction}")
        if self.crop_scale_min is not None and not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"--crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        for name in ("blur_probability", "horizontal_flip_probability"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"--{name} must be a probability in [0, 1], got {value}")
        if self.color_jitter_strength < 0:
            raise ValueError(f"--color_jitter_strength must be >= 0, got {self.color_jitter_strength}")
        if self.num_augmentations is not None and self.num_augmentations < 2:
            raise ValueError(
                f"--num_augmentations {self.num_augmentations} cannot give two different views; use >= 2 (or unset)"
            )


@dataclass
class ModelArguments:
    """The encoder: a timm backbone and a projection head."""

    _argument_group_name = "model"

    backbone: str = field(default="resnet18", metadata={"help": "timm architecture of the backbone."})
    pretrained_backbone: bool = field(default=False, metadata={"help": "Start from timm's pretrained weights."})
    projection_dim: int | None = field(default=128, metadata={"help": "Projection head output size (None: no head)."})
    projection_hidden_dim: int | None = field(
        default=None, metadata={"help": "Hidden size of the projection MLP (default: the backbone's feature size)."}
    )
    projection_batch_norm: bool = field(
        default=True, metadata={"help": "BatchNorm in the projection head (SimCLR); false: Linear-ReLU-Linear."}
    )
    backbone_kwargs: str | None = field(
        default=None,
        metadata={
            "help": 'JSON dict of extra timm.create_model arguments, e.g. \'{"norm_layer": "groupnorm"}\' '
            "(GroupNorm instead of BatchNorm, as the EMC² reference code)."
        },
    )

    def __post_init__(self) -> None:
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"--projection_dim must be >= 1 (or None for no head), got {self.projection_dim}")
        if isinstance(self.backbone_kwargs, str):
            try:
                parsed = json.loads(self.backbone_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"--backbone_kwargs must be a JSON object, got {self.backbone_kwargs!r}: {error}"
                ) from None
            if not isinstance(parsed, dict):
                raise ValueError(f"--backbone_kwargs must be a JSON object, got {self.backbone_kwargs!r}")
            self.backbone_kwargs = parsed
