"""Pre-train a timm ResNet-50 on ImageNet-100 with EMC² (or SogCLR / SimCLR), as in the EMC² paper.

ImageNet-100 is the 100-class subset of ImageNet-1k of Tian et al. (2020); the class list ships with the library
(``emc2_hf.data.imagenet100_classes()``). From the Hub (``clane9/imagenet-100``: splits train / validation):

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/imagenet100.py --config imagenet100_b256

From ImageNet-1k on the Hub (gated; the 100 classes are selected by label) or from a local ImageNet copy laid out as
``DIR/train/<wnid>/*.JPEG`` and ``DIR/val/<wnid>/*.JPEG`` (all 1000 folders or only the 100):

    accelerate launch recipes/imagenet100.py --config imagenet100_b256 --dataset_name ILSVRC/imagenet-1k
    accelerate launch recipes/imagenet100.py --config imagenet100_b256 --dataset_name /data/imagenet

Takes every flag of ``recipes/stl10.py``; the defaults differ: ResNet-50 with a 2048→2048→128 projection head,
224 px views with ImageNet-100's augmentations, and ``--select_imagenet100`` when the data has more than 100 classes.
"""

from __future__ import annotations

import os

from emc2_hf.pretraining import main as run_recipe

PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
DEFAULTS = {
    "dataset_name": "clane9/imagenet-100",
    "train_split": "train",
    "probe_train_split": "train",
    "eval_split": "validation",
    "backbone": "resnet50",
    "projection_dim": 128,
    "projection_hidden_dim": 2048,
    "output_dir": "runs/imagenet100",
}


def main(args: list[str] | None = None) -> dict[str, float]:
    return run_recipe(
        args,
        defaults=DEFAULTS,
        presets_dir=PRESETS_DIR,
        default_augmentation="imagenet100",
        default_select_imagenet100=True,
        prog="imagenet100.py",
        description=__doc__.split("\n\n")[0],
    )


if __name__ == "__main__":
    main()
