"""Step time of every objective against the same model trained with a plain InfoNCE loss, measured in one run.

    python benchmarks/step_time.py --batch_sizes 32 256 --image_size 32 --repetitions 7

A step is forward of both views, the loss, backward and an AdamW update, on ResNet-18 (timm, 512-d features,
128-d projection) at ``image_size`` px. "InfoNCE (plain)" is ``F.cross_entropy`` on the masked logits, written by hand:
the baseline the objectives are compared to. For EMC² it also reports the sweep alone (median over the same steps) and
the fraction of anchors whose chain started the step on a state outside the batch. "emc2 exact" is EMC²'s exact mode
as the trainer runs it: the ``k`` distinct states outside the batch are encoded in the same forward pass as the views
(``2b + k`` images, random pixels like the views) and passed to the objective; its row reports the measured
``reencoded_fraction`` and ``k``. Fetching and transforming the ``k`` training images (the trainer does it in the main
process) is not included. The chains are warmed up on a simulated dataset of ``--dataset_size`` images first, so the
fractions are the steady-state ones.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from emc2_hf import ContrastiveEncoder, ContrastiveEncoderConfig
from emc2_hf.objectives import build_objective, pair_views
from emc2_hf.sampling import keyed_generator

from common import median_seconds, print_table


def plain_info_nce(embeddings: torch.Tensor, beta: float) -> torch.Tensor:
    z = F.normalize(embeddings.float(), dim=1)
    logits = beta * z @ z.t()
    n = logits.shape[0]
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = (torch.arange(n, device=z.device) + n // 2) % n
    return F.cross_entropy(logits, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--dataset_size", type=int, default=5000)
    parser.add_argument("--beta", type=float, default=5.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="append results as JSON lines to this file")
    args = parser.parse_args()
    device = torch.device(args.device)

    rows = []
    for batch_size in args.batch_sizes:
        torch.manual_seed(0)
        model = ContrastiveEncoder(ContrastiveEncoderConfig(backbone=args.backbone)).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        pixels = torch.randn(2 * batch_size, 3, args.image_size, args.image_size, device=device)
        objectives = {
            name: build_objective(name, args.dataset_size, args.beta).to(device)
            for name in ("emc2", "sogclr", "simclr")
        }
        exact = build_objective("emc2", args.dataset_size, args.beta, exact=True).to(device)
        state_pixels = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)  # k ≤ b states
        generator = torch.Generator().manual_seed(0)
        state = {"step": 0, "indices": None}

        def next_indices() -> torch.Tensor:
            return torch.randperm(args.dataset_size, generator=generator)[:batch_size].to(device)

        # Warm the chains / u up on random embeddings: ~3 epochs of the simulated dataset.
        emc2 = objectives["emc2"]
        for step in range(3 * args.dataset_size // batch_size):
            with torch.no_grad():
                objectives["emc2"](torch.randn(2 * batch_size, 128, device=device), next_indices(), step=step)
                objectives["sogclr"](torch.randn(2 * batch_size, 128, device=device), next_indices(), step=step)
                indices = next_indices()
                states = exact.states_to_encode(indices)
                exact(
                    torch.randn(2 * batch_size, 128, device=device),
                    indices,
                    step=step,
                    extra_embeddings=torch.randn(states.numel(), 128, device=device),
                    extra_dataset_indices=states,
                )

        def train_step(loss_fn) -> None:
            state["step"] += 1
            indices = next_indices()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(pixel_values=pixels).embeddings, indices)
            loss.backward()
            optimizer.step()

        reencoded = {"fraction": [], "states": []}

        def exact_step() -> None:
            # As ContrastiveTrainer runs it: the views and the k states outside the batch in one forward pass.
            state["step"] += 1
            indices = next_indices()
            states = exact.states_to_encode(indices)
            optimizer.zero_grad(set_to_none=True)
            embeddings = model(pixel_values=torch.cat([pixels, state_pixels[: states.numel()]])).embeddings
            output = exact(
                embeddings[: 2 * batch_size],
                indices,
                step=state["step"],
                extra_embeddings=embeddings[2 * batch_size :],
                extra_dataset_indices=states,
            )
            output.loss.backward()
            optimizer.step()
            reencoded["fraction"].append(output.metrics["reencoded_fraction"].item())
            reencoded["states"].append(states.numel())

        losses = {"InfoNCE (plain)": lambda e, i: plain_info_nce(e, args.beta)}
        for name, objective in objectives.items():
            losses[name] = lambda e, i, objective=objective: objective(e, i, step=state["step"]).loss
        steps = {name: lambda loss_fn=loss_fn: train_step(loss_fn) for name, loss_fn in losses.items()}
        steps["emc2 exact"] = exact_step
        # Interleave the methods over repetitions so drift (thermal, other load) hits all of them alike.
        for step_fn in steps.values():
            median_seconds(step_fn, 1, 2, device)
        reencoded["fraction"].clear()
        reencoded["states"].clear()
        samples = {name: [] for name in steps}
        for _ in range(args.repetitions):
            for name, step_fn in steps.items():
                samples[name].append(median_seconds(step_fn, 1, 0, device))
        timings = {name: sorted(values)[len(values) // 2] for name, values in samples.items()}

        # The sweep alone and the out-of-batch start fraction, on embeddings of the real model's size.
        embeddings = torch.randn(2 * batch_size, 128, device=device)
        sweep_times, outside = [], []
        for repetition in range(args.repetitions):
            indices = next_indices()
            pairs = pair_views(embeddings, indices)
            stored = emc2.chains.state_index[pairs.anchor_dataset_indices]
            starts_outside = ~(stored[:, None] == indices[None, :]).any(dim=1)
            outside.append(starts_outside.float().mean().item())
            start = time.perf_counter()
            emc2.negative_weights(pairs, keyed_generator(0, repetition))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            sweep_times.append(time.perf_counter() - start)
        sweep = sorted(sweep_times)[len(sweep_times) // 2]

        base = timings["InfoNCE (plain)"]
        for name, seconds in timings.items():
            extra = ""
            if name == "emc2":
                extra = (
                    f"sampler {1e3 * sweep:.2f} ms = {100 * sweep / seconds:.2f}% of the step; "
                    f"{100 * sum(outside) / len(outside):.0f}% of anchors start outside the batch"
                )
            if name == "emc2 exact":
                fractions, states = reencoded["fraction"], reencoded["states"]
                extra = (
                    f"reencoded_fraction {sum(fractions) / len(fractions):.3f}; "
                    f"{sum(states) / len(states):.1f} extra images per step (k)"
                )
            rows.append([batch_size, name, f"{1e3 * seconds:.1f}", f"{seconds / base:.3f}", extra])
    print_table(
        f"Step time, {args.backbone} at {args.image_size} px on {device.type} (median of {args.repetitions})",
        ["b", "objective", "step (ms)", "ratio to plain InfoNCE", "EMC² sampler / re-encoding"],
        rows,
        args.output,
    )


if __name__ == "__main__":
    main()
