"""Pre-train a timm ResNet on STL-10 with EMC² (or SogCLR / SimCLR) and report linear-probe and 1-NN accuracy.

Offline demo on scikit-learn's bundled digits (the default dataset; about a minute on a laptop CPU):

    python recipes/stl10.py --objective emc2 --output_dir runs/digits-emc2 --max_steps 200

A row of the EMC² paper's Table 3 (a GPU job), from the Hub (``jxie/stl10``: splits unlabeled / train / test):

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/stl10.py --config stl10_b32

or from a local copy (a ``save_to_disk`` folder, the downloaded parquet repository, or an imagefolder):

    accelerate launch recipes/stl10.py --config stl10_b32 --dataset_name /data/stl10

Presets (``recipes/presets``): ``stl10_b32``, ``stl10_b256``, ``stl10_subset_b4_sgd``; any flag after ``--config``
overrides the file. Writes the encoder (``from_pretrained(output_dir)``), its timm/transformers export with a model
card (``output_dir/export``; ``--push_to_hub --hub_model_id user/name`` uploads it), ``eval_results.json`` with the
probe accuracies before and after training, and checkpoints that carry the per-sample state.
"""

from __future__ import annotations

import os

from emc2_hf.pretraining import main as run_recipe

PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
DEFAULTS = {"output_dir": "runs/stl10", "per_device_train_batch_size": 32}


def main(args: list[str] | None = None) -> dict[str, float]:
    return run_recipe(
        args,
        defaults=DEFAULTS,
        presets_dir=PRESETS_DIR,
        default_augmentation="stl10",
        prog="stl10.py",
        description=__doc__.split("\n\n")[0],
    )


if __name__ == "__main__":
    main()
