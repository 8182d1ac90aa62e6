"""The Metropolis–Hastings sweep alone against batch size: how its time grows with b (R = 2b − 2 proposals).

    python benchmarks/sweep_scaling.py --batch_sizes 32 64 128 256 512 1024

Times ``EMC2Objective.negative_weights`` (the view picks, proposals, the sweep, the weights and the chain update) on
random embeddings, with every chain already on a state outside the batch (a state column each, as in steady state),
median over repetitions, and reports the growth exponent between consecutive sizes (time ∝ b^k).
"""

from __future__ import annotations

import argparse
import math

import torch

from emc2_hf.objectives import EMC2Objective, states_to_encode, two_view_problem
from emc2_hf.sampling import keyed_generator

from common import median_seconds, print_table


def _to(problem, device: torch.device):
    import dataclasses

    return dataclasses.replace(
        problem,
        **{
            field.name: getattr(problem, field.name).to(device)
            for field in dataclasses.fields(problem)
            if isinstance(getattr(problem, field.name), torch.Tensor)
        },
    )


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
        objective = EMC2Objective(args.dataset_size, 5.0)
        generator = torch.Generator().manual_seed(batch_size)
        counter = iter(range(10**9))

        def problem():
            indices = torch.randperm(args.dataset_size, generator=generator)[:batch_size]
            # Steady state: every chain on a view of another image outside the batch.
            objective.chains.state_index[indices] = (indices[:, None] + 1 + torch.arange(2)) % args.dataset_size
            objective.chains.state_view[indices] = torch.arange(2)
            keys = indices.repeat(2)
            slots = torch.arange(2).repeat_interleave(batch_size)
            start_keys, start_views = objective.chain_starts(keys, slots)
            state_keys, state_views = states_to_encode(start_keys, start_views, keys, slots)
            return two_view_problem(
                torch.randn(2 * batch_size, 128),
                indices,
                state_embeddings=torch.randn(state_keys.numel(), 128),
                state_keys=state_keys,
                state_views=state_views,
                start_keys=start_keys,
                start_views=start_views,
            )

        batches = [problem() for _ in range(8)]
        objective.to(device)
        batches = [_to(problem, device) for problem in batches]

        def sweep() -> None:
            step = next(counter)
            objective.negative_weights(batches[step % len(batches)], keyed_generator(0, step, device=device))

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
