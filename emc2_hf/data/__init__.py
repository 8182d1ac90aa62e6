"""Data: loading (Hub or local), image decoding, augmentations, the two-view collator, digits, dataset indices."""

from .augmentations import AUGMENTATION_PRESETS, SimCLRAugmentation
from .collator import ContrastiveCollator, MissingColumnError
from .digits import load_digits_dataset
from .imagenet100 import imagenet100_classes, select_imagenet100
from .images import decode_image
from .indexed import IndexedDataset, with_dataset_index
from .sources import DatasetUnavailableError, load_image_split

__all__ = [
    "AUGMENTATION_PRESETS",
    "DatasetUnavailableError",
    "ContrastiveCollator",
    "IndexedDataset",
    "MissingColumnError",
    "SimCLRAugmentation",
    "decode_image",
    "imagenet100_classes",
    "load_image_split",
    "load_digits_dataset",
    "select_imagenet100",
    "with_dataset_index",
]
