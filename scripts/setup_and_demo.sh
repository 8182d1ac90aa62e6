#!/usr/bin/env bash
# Creates .venv, installs emc2_hf with its dev tools, and pre-trains a ResNet-18 with EMC² on the bundled digits.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch 2.14.1 + torchvision 0.29.1 is a pair that imports together (timm needs torchvision).
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
# The demo starts over each time (the recipe refuses to start a new run beside an earlier run's checkpoints).
rm -rf runs/digits-emc2
.venv/bin/python recipes/stl10.py --dataset_name digits --objective emc2 --output_dir runs/digits-emc2 \
    --per_device_train_batch_size 32 --max_steps 200 --report_to none "$@"
