"""Step time of the EMC² objective with per-sample state sized for 1k, 100k and 10M training examples.

    python benchmarks/state_size.py --dataset_sizes 1000 100000 10000000 --batch_size 256

The objective step (problem, sweep, weights, state update, surrogate and its backward) on fixed random embeddings,
with EMC²'s chain states as state columns (random embeddings), median over repetitions; the state's memory is
``m × 2 × (8 + 8 + 4)`` bytes for EMC² (two chains per example: index, view key, similarity) and ``m × (4 + 1)``
for SogCLR. The sampler touches only the batch's entries, so time must not grow with ``m``.
"""

from __future__ import annotations

import argparse

import torch

from emc2_hf.objectives import build_objective, states_to_encode

from common import median_seconds, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_sizes", type=int, nargs="+", default=[1_000, 100_000, 10_000_000])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repetitions", type=int, default=11)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in ("emc2", "sogclr"):
        base = None
        for size in args.dataset_sizes:
            objective = build_objective(name, size, 5.0).to(device)
            memory = sum(buffer.numel() * buffer.element_size() for buffer in objective.buffers())
            generator = torch.Generator().manual_seed(0)
            embeddings = torch.randn(2 * args.batch_size, 128, device=device, requires_grad=True)
            step = iter(range(10**9))
            # Batches drawn before timing: a 10M-element randperm per step would dwarf the objective.
            batches = [torch.randperm(size, generator=generator)[: args.batch_size].to(device) for _ in range(4)]

            def run() -> None:
                current = next(step)
                indices = batches[current % len(batches)]
                arguments = {}
                if objective.reencodes_chain_states:
                    keys, slots = indices.repeat(2), torch.arange(2, device=device).repeat_interleave(indices.numel())
                    start_keys, start_views = objective.chain_starts(keys, slots)
                    state_keys, state_views = states_to_encode(start_keys, start_views, keys, slots)
                    arguments = {
                        "state_embeddings": torch.randn(state_keys.numel(), 128, device=device, requires_grad=True),
                        "state_keys": state_keys,
                        "state_views": state_views,
                        "start_keys": start_keys,
                        "start_views": start_views,
                    }
                objective(embeddings, indices, step=current, **arguments).loss.backward()

            seconds = median_seconds(run, args.repetitions, 3, device)
            base = base or seconds
            rows.append(
                [name, f"{size:,}", f"{memory / 2**20:.2f} MiB", f"{1e3 * seconds:.2f}", f"{seconds / base:.2f}"]
            )
    print_table(
        f"Objective step vs training-set size m, b = {args.batch_size} on {device.type}",
        ["objective", "m", "state memory", "step (ms)", "ratio to smallest m"],
        rows,
        args.output,
    )


if __name__ == "__main__":
    main()
