"""Data: image decoding, SimCLR augmentations, the two-view collator, the offline digits dataset, dataset indices."""

from .augmentations import SimCLRAugmentation
from .collator import ContrastiveCollator, MissingColumnError
from .digits import load_digits_dataset
from .images import decode_image
from .indexed import IndexedDataset, with_dataset_index

__all__ = [
    "ContrastiveCollator",
    "IndexedDataset",
    "MissingColumnError",
    "SimCLRAugmentation",
    "decode_image",
    "load_digits_dataset",
    "with_dataset_index",
]
