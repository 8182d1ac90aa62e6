"""Images per second the decoding + augmentation pipeline sustains with 0, 1 and 2 DataLoader workers, beside the
encoder's consumption rate (ResNet-18 forward + backward) at the same image size.

    python benchmarks/augmentation_throughput.py --image_size 96 --source_size 96 --batch_size 64

The data are PNG-encoded random RGB images of ``source_size`` px in a ``datasets.Dataset`` (undecoded, as the trainer
feeds them), so decoding is included; each image yields two augmented views (SimCLR augmentations).
"""

from __future__ import annotations

import argparse
import io
import time

import datasets
import numpy as np
import torch
from PIL import Image

from emc2_hf import ContrastiveCollator, ContrastiveEncoder, ContrastiveEncoderConfig, SimCLRAugmentation
from emc2_hf.data import with_dataset_index

from common import median_seconds, print_table


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--source_size", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_images", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [
        {"bytes": png(rng.integers(0, 256, (args.source_size, args.source_size, 3), dtype=np.uint8)), "path": None}
        for _ in range(args.num_images)
    ]
    dataset = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    dataset = with_dataset_index(dataset, "image", "dataset_index")
    # Keyed views, as the ContrastiveTrainer uses them.
    collator = ContrastiveCollator(augmentation=SimCLRAugmentation(image_size=args.image_size), seed=0)
    rows = []
    for workers in args.workers:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            num_workers=workers,
            collate_fn=collator,
            drop_last=True,
            persistent_workers=workers > 0,
        )
        next(iter(loader))  # start the workers
        start = time.perf_counter()
        count = sum(batch["dataset_index"].numel() for batch in loader)
        seconds = time.perf_counter() - start
        rows.append([f"pipeline, {workers} worker(s)", f"{count / seconds:.0f}", f"{2 * count / seconds:.0f}"])

    model = ContrastiveEncoder(ContrastiveEncoderConfig(backbone="resnet18")).train()
    pixels = torch.randn(2 * args.batch_size, 3, args.image_size, args.image_size)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixels).embeddings.sum().backward()

    seconds = median_seconds(step, 3, 1, torch.device("cpu"))
    rows.append(
        [
            "ResNet-18 forward + backward (consumer)",
            f"{args.batch_size / seconds:.0f}",
            f"{2 * args.batch_size / seconds:.0f}",
        ]
    )
    print_table(
        f"Augmentation pipeline vs encoder, {args.source_size} px sources → {args.image_size} px views, "
        f"batch {args.batch_size}",
        ["stage", "images/s", "views/s"],
        rows,
        args.output,
    )


if __name__ == "__main__":
    main()
