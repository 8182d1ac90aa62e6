"""The Metropolis–Hastings sweep alone against batch size: how its time grows with b (R = 2b − 2 proposals).

    python benchmarks/sweep_scaling.py --batch_sizes 32 64 128 256 512 1024

Times ``EMC2Objective.negative_weights`` (proposals, the sweep, visit frequencies and the chain update) on random
embeddings, median over repetitions, and reports the growth exponent between consecutive sizes (time ∝ b^k).
"""

from __future__ import annotations

import argparse
import math

import torch

from emc2_hf.objectives import EMC2Objective, pair_views
from emc2_hf.sampling import keyed_generator

from common import median_seconds, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--dataset_size", type=int, default=100_000)
    parser.add_argument("--repetitions", type=int, default=11)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows, previous = [], None
    for batch_size in args.batch_sizes:
        objective = EMC2Objective(args.dataset_size, 5.0).to(device)
        generator = torch.Generator().manual_seed(batch_size)
        counter = iter(range(10**9))

        batches = [
            pair_views(
                torch.randn(2 * batch_size, 128, device=device),
                torch.randperm(args.dataset_size, generator=generator)[:batch_size].to(device),
            )
            for _ in range(8)
        ]

        def sweep() -> None:
            step = next(counter)
            objective.negative_weights(batches[step % len(batches)], keyed_generator(0, step))

        seconds = median_seconds(sweep, args.repetitions, 3, device)
        growth = (
            "" if previous is None else f"{math.log(seconds / previous[1]) / math.log(batch_size / previous[0]):.2f}"
        )
        rows.append([batch_size, 2 * batch_size - 2, f"{1e3 * seconds:.2f}", growth])
        previous = (batch_size, seconds)
    print_table(
        f"EMC² sampler alone on {device.type} (median of {args.repetitions})",
        ["b", "R", "time (ms)", "growth exponent k (time ∝ b^k)"],
        rows,
        args.output,
    )


if __name__ == "__main__":
    main()
