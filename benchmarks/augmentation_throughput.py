"""Images per second the decoding + augmentation pipeline sustains with 0, 1 and 2 DataLoader workers, beside the
encoder's consumption rate (ResNet-18 forward + backward) at the same image size.

    python benchmarks/augmentation_throughput.py --preset stl10 --source_size 96 --batch_size 64
    python benchmarks/augmentation_throughput.py --preset imagenet100 --source_size 500 375 --source_format JPEG \
        --backbone resnet50 --consumer_batch_size 16

The data are random RGB images encoded as ``source_format`` (STL-10 on the Hub: 96×96 PNG; ImageNet: JPEGs of about
500×375) in a ``datasets.Dataset`` (undecoded, as the trainer feeds them), so decoding is included; each image yields
two augmented views with the ``preset``'s augmentations (:data:`~emc2_hf.data.augmentations.AUGMENTATION_PRESETS`).
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


def encode(array: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="stl10", help="augmentation preset (stl10, imagenet100, digits)")
    parser.add_argument("--image_size", type=int, default=None, help="view size (default: the preset's)")
    parser.add_argument("--source_size", type=int, nargs="+", default=[96], help="width [height] of the sources")
    parser.add_argument("--source_format", default="PNG")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18", help="timm backbone of the consumer")
    parser.add_argument("--consumer_batch_size", type=int, default=None, help="default: --batch_size")
    parser.add_argument("--num_images", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    width, height = args.source_size[0], args.source_size[-1]
    # Smooth random images (upsampled noise), so that JPEG/PNG sizes are closer to photographs than white noise.
    low = [rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8) for _ in range(16)]
    sources = [np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR)) for array in low]
    images = [
        {"bytes": encode(sources[k % len(sources)], args.source_format), "path": None} for k in range(args.num_images)
    ]
    dataset = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    dataset = with_dataset_index(dataset, "image", "dataset_index")
    # Keyed views, as the ContrastiveTrainer uses them.
    overrides = {"image_size": args.image_size} if args.image_size else {}
    augmentation = SimCLRAugmentation.from_preset(args.preset, **overrides)
    collator = ContrastiveCollator(augmentation=augmentation, seed=0)
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
        # One iterator: the clock starts once the first batch has arrived (workers started), and no prefetched
        # batch is thrown away (a second iter() over persistent workers would discard their prefetched batches).
        batches = iter(loader)
        next(batches)
        start = time.perf_counter()
        count = sum(batch["dataset_index"].numel() for batch in batches)
        seconds = time.perf_counter() - start
        rows.append([f"pipeline, {workers} worker(s)", f"{count / seconds:.0f}", f"{2 * count / seconds:.0f}"])

    model = ContrastiveEncoder(ContrastiveEncoderConfig(backbone=args.backbone)).train()
    consumer_batch = args.consumer_batch_size or args.batch_size
    pixels = torch.randn(2 * consumer_batch, 3, augmentation.image_size, augmentation.image_size)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixels).embeddings.sum().backward()

    seconds = median_seconds(step, 3, 1, torch.device("cpu"))
    rows.append(
        [
            f"{args.backbone} forward + backward (consumer, batch {consumer_batch})",
            f"{consumer_batch / seconds:.1f}",
            f"{2 * consumer_batch / seconds:.1f}",
        ]
    )
    print_table(
        f"Augmentation pipeline ({args.preset} preset) vs encoder, {width}×{height} {args.source_format} sources → "
        f"{augmentation.image_size} px views, batch {args.batch_size}",
        ["stage", "images/s", "views/s"],
        rows,
        args.output,
    )


if __name__ == "__main__":
    main()
