"""What high-loss batch selection costs per training step, against a plain InfoNCE step measured in the same run.

    python benchmarks/batch_selection_cost.py --dataset_sizes 1000 5000 --batch_size 32

Once per epoch the trainer embeds both views of every training example (eval mode, no gradient: ``2m`` forward
passes) and the sampler chooses the epoch's ``m // B`` batches (spectral clustering: an ``m × m`` affinity, its
spectral embedding and k-means; ordered SGD: the loss of ``k`` random candidates per step). Spread over the epoch's
steps, that is the per-step overhead reported here, as a ratio to a plain InfoNCE training step (forward of ``2B``
views, ``F.cross_entropy``, backward, AdamW) of the same ResNet on random pixels. Decoding the images is not timed.
"""

from __future__ import annotations

import argparse
import time

import torch

from emc2_hf import ContrastiveEncoder, ContrastiveEncoderConfig
from emc2_hf.sampling.batch_selection import build_batch_sampler

from common import median_seconds, plain_info_nce, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--beta", type=float, default=5.0)
    parser.add_argument("--osgd_candidates", type=int, default=4)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ContrastiveEncoder(ContrastiveEncoderConfig(backbone=args.backbone)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(2 * args.batch_size, 3, args.image_size, args.image_size, device=device)

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        plain_info_nce(model(pixel_values=pixels).embeddings, args.beta).backward()
        optimizer.step()

    step_seconds = median_seconds(plain_step, args.repetitions, 2, device)

    def embed_chunk() -> None:
        model.eval()
        with torch.no_grad():
            model(pixel_values=pixels)
        model.train()

    # Seconds per image of the epoch's embedding pass (eval, no gradient), in chunks of 2B images.
    embed_per_image = median_seconds(embed_chunk, args.repetitions, 1, device) / pixels.shape[0]
    rows = []
    for size in args.dataset_sizes:
        steps = size // args.batch_size
        embed_seconds = embed_per_image * 2 * size
        embeddings = torch.nn.functional.normalize(torch.randn(size, 2, 128), dim=-1)
        for name, options in (
            ("spectral_clustering", {}),
            ("ordered_sgd", {"num_candidates": args.osgd_candidates}),
        ):
            sampler = build_batch_sampler(name, size, args.batch_size, seed=0, **options)
            start = time.perf_counter()
            sampler.update(embeddings, args.beta, epoch=0)
            select_seconds = time.perf_counter() - start
            overhead = (embed_seconds + select_seconds) / steps
            rows.append(
                [
                    size,
                    args.batch_size,
                    name,
                    f"{embed_seconds:.2f}",
                    f"{select_seconds:.2f}",
                    f"{1e3 * overhead:.1f}",
                    f"{1e3 * step_seconds:.1f}",
                    f"{(step_seconds + overhead) / step_seconds:.3f}",
                ]
            )
    print_table(
        f"Batch selection per epoch, {args.backbone} at {args.image_size} px on {device.type}",
        [
            "m",
            "B",
            "selection",
            "embed (s/epoch)",
            "select (s/epoch)",
            "overhead (ms/step)",
            "plain step (ms)",
            "ratio to plain step",
        ],
        rows,
        args.output,
    )


if __name__ == "__main__":
    main()
