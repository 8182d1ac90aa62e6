"""Data: loading (Hub or local), image decoding, augmentations, the two-view and image–text collators, image–caption
loaders (Flickr30k, COCO Karpathy, local folders), digits, dataset indices."""

from .augmentations import AUGMENTATION_PRESETS, SimCLRAugmentation
from .collator import ContrastiveCollator, MissingColumnError
from .digits import load_digits_dataset
from .image_text import (
    DIGIT_CLASS_NAMES,
    ImageTextDataError,
    drop_bad_image_text_rows,
    find_bad_image_text_rows,
    load_captioned_images,
    load_coco_karpathy,
    load_digits_captions,
    load_flickr30k,
    load_image_text_split,
)
from .image_text_collator import ImageTextCollator, ImageTextTransforms
from .imagenet100 import imagenet100_classes, select_imagenet100
from .images import decode_image
from .indexed import IndexedDataset, with_dataset_index
from .sources import DatasetUnavailableError, load_image_split

__all__ = [
    "AUGMENTATION_PRESETS",
    "DIGIT_CLASS_NAMES",
    "ImageTextCollator",
    "ImageTextDataError",
    "ImageTextTransforms",
    "drop_bad_image_text_rows",
    "find_bad_image_text_rows",
    "load_captioned_images",
    "load_coco_karpathy",
    "load_digits_captions",
    "load_flickr30k",
    "load_image_text_split",
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
