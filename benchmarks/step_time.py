"""Step time of every objective against the same model trained with a plain InfoNCE loss, measured in one run.

    python benchmarks/step_time.py --batch_sizes 32 256 --image_size 32 --repetitions 7

A step is forward of both views, the loss, backward and an AdamW update, on ResNet-18 (timm, 512-d features,
128-d projection) at ``image_size`` px. "InfoNCE (plain)" is ``F.cross_entropy`` on the masked logits, written by hand:
the baseline the objectives are compared to. Objectives that re-encode chain states (``emc2``) encode, as
``ContrastiveTrainer`` does, the ``k`` states the batch does not hold in the same forward pass as the views
(``2b + k`` images, random pixels like the views; the collator reads and augments them in DataLoader workers, which
is not timed here); their row reports ``k`` and the metrics of the objective. For every EMC² objective it also reports
the sampler alone (``negative_weights``: picks, proposals, sweep, state update; median over the same steps). The chains
are warmed up on a simulated dataset of ``--dataset_size`` images with fresh views every step first, so ``k`` and the
fractions are the steady-state ones.

The negative cache (``negative_cache``) does, as ``ContrastiveTrainer`` does: re-embed ``⌈ρ m⌉`` cache entries
(eval mode, no gradient; ``m = --dataset_size``), encode the views in eval mode without gradient and draw one negative
per anchor view by Gumbel-max over the cache, then encode the distinct draws with gradient in the views' forward
pass; the decoding of those images (in the training process) is not timed, like the collator's.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from emc2_hf import ContrastiveEncoder, ContrastiveEncoderConfig
from emc2_hf.objectives import OBJECTIVES, build_objective, parse_objective_spec, states_to_encode, two_view_problem
from emc2_hf.sampling import chain_selection, keyed_generator

from common import median_seconds, plain_info_nce, print_table


class SimulatedBatches:
    """Random batches of a dataset of ``size`` images, with fresh view keys every step (as the collator makes)."""

    def __init__(self, size: int, batch_size: int, device: torch.device) -> None:
        self.size, self.batch_size, self.device = size, batch_size, device
        self.generator = torch.Generator().manual_seed(0)
        self.count = 0

    def next(self) -> dict[str, torch.Tensor]:
        self.count += 1
        indices = torch.randperm(self.size, generator=self.generator)[: self.batch_size]
        view_keys = torch.randint(0, 2**62, (2 * self.batch_size,), generator=self.generator)
        slots = torch.arange(2).repeat_interleave(self.batch_size)
        return {
            "indices": indices.to(self.device),
            "view_keys": view_keys.to(self.device),
            "slots": slots.to(self.device),
            "epoch": self.count * self.batch_size // self.size,
        }


def state_arguments(objective, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The starts of the batch's chains and the states to encode (without their embeddings)."""
    keys = batch["indices"].repeat(2)
    chained = chain_selection(0, batch["epoch"], keys.cpu(), batch["slots"].cpu(), objective.chain_fraction)
    chained = chained.to(keys.device)
    start_keys, start_views = objective.chain_starts(keys, batch["slots"])
    state_keys, state_views = states_to_encode(start_keys, start_views, keys, batch["view_keys"], chained)
    return {
        "state_keys": state_keys,
        "state_views": state_views,
        "start_keys": start_keys,
        "start_views": start_views,
        "chain_anchors": chained,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--dataset_size", type=int, default=5000)
    parser.add_argument("--beta", type=float, default=5.0)
    parser.add_argument(
        "--objectives",
        nargs="+",
        default=[*OBJECTIVES, "emc2:chain_fraction=0.25", "emc2:chain_fraction=0.1"],
        help="registry names or variants 'name:option=value,...'",
    )
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
        state_pixels = torch.randn(2 * batch_size, 3, args.image_size, args.image_size, device=device)  # k ≤ 2b
        objectives = {}
        for spec in args.objectives:
            name, options = parse_objective_spec(spec)
            objectives[spec] = build_objective(name, args.dataset_size, args.beta, **options).to(device)
        batches = SimulatedBatches(args.dataset_size, batch_size, device)
        state = {"step": 0}

        for objective in objectives.values():
            if objective.reencodes_cache_negatives:
                objective.write_cache(torch.arange(args.dataset_size), torch.randn(args.dataset_size, 128))
        refresh_pixels = torch.randn(
            max([o.refresh_count for o in objectives.values() if o.reencodes_cache_negatives], default=0),
            3,
            args.image_size,
            args.image_size,
            device=device,
        )

        # Warm the per-sample state up on random embeddings: ~3 epochs of the simulated dataset.
        for step in range(3 * args.dataset_size // batch_size):
            for objective in objectives.values():
                if objective.reencodes_cache_negatives:
                    continue
                batch = batches.next()
                arguments = {"view_keys": batch["view_keys"], "view_slots": batch["slots"]}
                if objective.reencodes_chain_states:
                    arguments.update(state_arguments(objective, batch))
                    arguments["state_embeddings"] = torch.randn(arguments["state_keys"].numel(), 128, device=device)
                with torch.no_grad():
                    objective(
                        torch.randn(2 * batch_size, 128, device=device), batch["indices"], step=step, **arguments
                    )

        reports: dict[str, dict[str, list[float]]] = {name: {"k": []} for name in objectives}

        def objective_step(name: str) -> None:
            objective = objectives[name]
            state["step"] += 1
            batch = batches.next()
            arguments = {"view_keys": batch["view_keys"], "view_slots": batch["slots"]}
            inputs = pixels
            if objective.reencodes_chain_states:
                arguments.update(state_arguments(objective, batch))
                inputs = torch.cat([pixels, state_pixels[: arguments["state_keys"].numel()]])
            optimizer.zero_grad(set_to_none=True)
            if objective.reencodes_cache_negatives:
                # As the trainer: refresh, draw from the views encoded in eval mode, then encode views + draws.
                refresh = objective.refresh_keys(state["step"])
                model.eval()
                with torch.no_grad():
                    objective.write_cache(refresh, model(pixel_values=refresh_pixels[: refresh.numel()]).embeddings)
                    anchors = F.normalize(model(pixel_values=pixels).embeddings.float(), dim=1)
                model.train()
                samples = objective.sample_negatives(anchors, batch["indices"].repeat(2), step=state["step"])
                distinct = torch.unique(samples)
                inputs = torch.cat([pixels, state_pixels[: distinct.numel()]])
                arguments.update(
                    state_keys=distinct,
                    state_views=torch.full_like(distinct, -1),
                    start_keys=samples[:, 0],
                    start_views=torch.full_like(samples[:, 0], -1),
                )
            embeddings = model(pixel_values=inputs).embeddings
            if objective.reencodes_chain_states or objective.reencodes_cache_negatives:
                arguments["state_embeddings"] = embeddings[2 * batch_size :]
            output = objective(embeddings[: 2 * batch_size], batch["indices"], step=state["step"], **arguments)
            output.loss.backward()
            optimizer.step()
            extra = refresh.numel() if objective.reencodes_cache_negatives else 0
            reports[name]["k"].append(inputs.shape[0] - 2 * batch_size + extra)
            for key, value in output.metrics.items():
                reports[name].setdefault(key, []).append(value.item())

        def plain_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            plain_info_nce(model(pixel_values=pixels).embeddings, args.beta).backward()
            optimizer.step()

        steps = {"InfoNCE (plain)": plain_step}
        steps.update({name: (lambda name=name: objective_step(name)) for name in objectives})
        # Interleave the methods over repetitions so drift (thermal, other load) hits all of them alike.
        for step_fn in steps.values():
            median_seconds(step_fn, 1, 2, device)
        for report in reports.values():
            report.clear()
            report["k"] = []
        samples = {name: [] for name in steps}
        for _ in range(args.repetitions):
            for name, step_fn in steps.items():
                samples[name].append(median_seconds(step_fn, 1, 0, device))
        timings = {name: sorted(values)[len(values) // 2] for name, values in samples.items()}

        # The sampler alone, on embeddings of the real model's size.
        sampler = {}
        for name, objective in objectives.items():
            if not name.startswith("emc2"):
                continue
            times = []
            for repetition in range(args.repetitions):
                batch = batches.next()
                arguments = {"view_keys": batch["view_keys"], "view_slots": batch["slots"]}
                if objective.reencodes_chain_states:
                    arguments.update(state_arguments(objective, batch))
                    arguments["state_embeddings"] = torch.randn(arguments["state_keys"].numel(), 128, device=device)
                problem = two_view_problem(
                    torch.randn(2 * batch_size, 128, device=device), batch["indices"], **arguments
                )
                start = time.perf_counter()
                objective.negative_weights(problem, keyed_generator(0, repetition))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            sampler[name] = sorted(times)[len(times) // 2]

        base = timings["InfoNCE (plain)"]
        for name, seconds in timings.items():
            notes = []
            objective = objectives.get(name)
            if objective is not None and objective.reencodes_cache_negatives:
                refreshed = f"{objective.refresh_count} refreshed"
                notes.append(f"{refreshed} (ρ = {objective.refresh_fraction:g}, m = {args.dataset_size}) of the k")
            if name in sampler:
                notes.append(
                    f"sampler {1e3 * sampler[name]:.2f} ms = {100 * sampler[name] / seconds:.2f}% of the step"
                )
            report = reports.get(name, {})
            if report.get("k") and max(report["k"]) > 0:
                notes.append(f"{sum(report['k']) / len(report['k']):.1f} extra images per step (k)")
            for key in ("reencoded_fraction", "start_sample_fraction", "outside_batch_sample_fraction"):
                if report.get(key):
                    notes.append(f"{key} {sum(report[key]) / len(report[key]):.3f}")
            rows.append([batch_size, name, f"{1e3 * seconds:.1f}", f"{seconds / base:.3f}", "; ".join(notes)])
    print_table(
        f"Step time, {args.backbone} at {args.image_size} px on {device.type} (median of {args.repetitions})",
        ["b", "objective", "step (ms)", "ratio to plain InfoNCE", "EMC² sampler / re-encoding"],
        rows,
        args.output,
    )


if __name__ == "__main__":
    main()
