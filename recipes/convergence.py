"""The EMC² paper's convergence experiment (Fig. 7) on the bundled digits: exact L and ‖∇L‖² against SGD steps.

    python recipes/convergence.py --output_dir runs/convergence

The first 500 training digits at 16 px, each with two fixed augmentations (the digits preset: crops of 50–100%, no
flips), make a finite dataset on which the global contrastive loss (1) and its full gradient are computed exactly
(:func:`~emc2_hf.evaluation.global_loss_and_gradient`). Every objective of the library trains the same encoder from
the same initialisation on the same batch sequence (an epoch-wise shuffle, batch 4, plain SGD with a constant step
size, no weight decay, β = 5) for ``--iterations`` steps (40,000 ≈ 320 epochs) at each of ``--learning_rates``; every
``--eval_every`` steps the exact ``L(θ)`` and ``‖∇L(θ)‖²`` are recorded. The objectives are every registered one and
two EMC² variants (the paper's visit-frequency weights; a quarter of the chains per epoch). A method that converges to
a stationary point of (1) drives ``‖∇L‖²`` toward 0 as the step size shrinks; a biased estimator (SimCLR's in-batch
InfoNCE at b = 4) stalls where its own objective is stationary, which is not a stationary point of (1) — and one that
stalls at a high loss with a small ``‖∇L‖²`` has stalled, not converged.

The encoder is a 2-layer MLP (768 → 256 → ReLU → 64): no BatchNorm, so the model is deterministic and L(θ) of the
dataset does not depend on how it is batched (BatchNorm would make it); small enough that 14 runs of 40,000 steps
and 40 exact evaluations each finish in minutes on 2 CPU cores; and a network (not a linear map), so the loss is
non-convex as in the paper. EMC²'s chain states are re-encoded exactly as the trainer does: the stored view of the
stored image, with the current encoder.

Writes ``output_dir/convergence.json`` (per step size and objective: the curve; ``final_loss`` and
``final_grad_norm_squared``, the means over the last 5 evaluations — SGD with a constant step fluctuates, one point is
noisy —; ``last_*`` at the last step; the run time; and ``criteria``, whether the default EMC² ends below SogCLR's
loss, within SimCLR's + 0.05 and at most a third of SimCLR's ‖∇L‖²),
``output_dir/convergence.png`` (L and ‖∇L‖² against steps) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from typing import Any

import torch
from torch import nn

from emc2_hf.data import ContrastiveCollator, SimCLRAugmentation, decode_image, load_digits_dataset
from emc2_hf.evaluation.diagnostics import global_loss_and_gradient
from emc2_hf.objectives import OBJECTIVES, build_objective, parse_objective_spec, states_to_encode, two_view_problem
from emc2_hf.sampling import chain_selection

FINAL_EVALUATIONS = 5
"""``final_*`` values are the mean of this many last evaluations."""
RECOMMENDED_LEARNING_RATE = 0.05
"""The step size the comparison is judged at: ‖∇L‖² of a stationary method scales with it (Theorem 3.7), so the
smaller of the two shows stationarity sooner; at 0.2 SGD's own noise needs ~50k steps to fall below SimCLR's bias."""
EMC2_VARIANTS = ("emc2:weighting=samples", "emc2:chain_fraction=0.25")
"""Besides every registered objective: EMC² with the paper's estimator (eq. (11)'s visit frequencies) and EMC² running
a quarter of its chains per epoch (the in-batch softmax as control variate)."""


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/convergence")
    parser.add_argument(
        "--objectives",
        nargs="+",
        default=[
            *(name for name, objective in OBJECTIVES.items() if not objective.reencodes_cache_negatives),
            *EMC2_VARIANTS,
        ],
        help="objectives to run: registry names, or variants 'name:option=value,...' "
        f"(e.g. emc2:weighting=samples); registry: {', '.join(OBJECTIVES)}",
    )
    parser.add_argument(
        "--learning_rates",
        type=float,
        nargs="+",
        default=[RECOMMENDED_LEARNING_RATE, 0.2],
        help=f"constant SGD step sizes (recommended: {RECOMMENDED_LEARNING_RATE})",
    )
    parser.add_argument("--iterations", type=int, default=40_000)
    parser.add_argument("--eval_every", type=int, default=1000)
    parser.add_argument("--num_images", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--inverse_temperature", type=float, default=5.0)
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--hidden_dim", type=int, default=256)
    parser.add_argument("--feature_dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (one CPU thread each)")
    arguments = parser.parse_args(argv)
    for name in ("iterations", "eval_every", "batch_size", "workers"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if arguments.batch_size < 2 or arguments.num_images < 2 * arguments.batch_size:
        parser.error("--batch_size must be >= 2 and --num_images at least twice the batch size")
    for spec in arguments.objectives:
        try:
            name, options = parse_objective_spec(spec)
            objective = build_objective(name, arguments.num_images, arguments.inverse_temperature, **options)
        except (TypeError, ValueError) as error:
            parser.error(f"--objectives {spec}: {error}")
        if objective.reencodes_cache_negatives:
            parser.error(
                f"--objectives {spec}: the negative cache draws unaugmented images and re-encodes them, which this "
                "fixed-view experiment does not model yet; compare it with recipes/compare.py"
            )
    return arguments


def fixed_augmentations(num_images: int, image_size: int, seed: int) -> torch.Tensor:
    """``FloatTensor[m, 2, 3·s·s]``: two fixed training views of each of the first ``m`` digits (collator keys)."""
    images = load_digits_dataset(image_size=image_size)["train"].select(range(num_images))["image"]
    collator = ContrastiveCollator(
        augmentation=SimCLRAugmentation.from_preset("digits", image_size=image_size), num_augmentations=2, seed=seed
    )
    views = []
    for index, image in enumerate(images):
        image = decode_image(image)
        views.append(torch.stack([collator.render(image, collator.view_key_and_slot(index, v)[0]) for v in (0, 1)]))
    return torch.stack(views).flatten(2)


def build_encoder(input_dim: int, hidden_dim: int, feature_dim: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, feature_dim))


def batch_order(num_images: int, batch_size: int, iterations: int, seed: int) -> torch.Tensor:
    """``LongTensor[iterations, b]``: an epoch-wise shuffle without replacement (the last short batch dropped)."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num_images // batch_size
    epochs = -(-iterations // per_epoch)
    batches = [torch.randperm(num_images, generator=generator)[: per_epoch * batch_size] for _ in range(epochs)]
    return torch.cat(batches).view(-1, batch_size)[:iterations]


def fixed_view_loss(
    encoder: nn.Module, objective: Any, views: torch.Tensor, batch: torch.Tensor, step: int, epoch: int, seed: int
) -> torch.Tensor:
    """The objective's loss on ``batch`` (``LongTensor[b]``) of the fixed views ``[m, 2, D]``, with EMC²'s chain
    states re-encoded exactly as the trainer does (the stored view of the stored image, current encoder) and, with a
    ``chain_fraction``, the chains of ``epoch`` selected as the collator selects them."""
    keys = batch.repeat(2)
    slots = torch.arange(2).repeat_interleave(batch.numel())  # view v of an image is its fixed augmentation v
    inputs = views[keys, slots]
    arguments: dict[str, torch.Tensor] = {"view_keys": slots, "view_slots": slots}
    if objective.reencodes_chain_states:
        chained = chain_selection(seed, epoch, keys, slots, objective.chain_fraction)
        start_keys, start_views = objective.chain_starts(keys, slots)
        state_keys, state_views = states_to_encode(start_keys, start_views, keys, slots, chained)
        inputs = torch.cat([inputs, views[state_keys, state_views]])
        arguments.update(
            state_keys=state_keys,
            state_views=state_views,
            start_keys=start_keys,
            start_views=start_views,
            chain_anchors=chained,
        )
    embeddings = encoder(inputs)
    if objective.reencodes_chain_states:
        arguments["state_embeddings"] = embeddings[keys.numel() :]
    problem = two_view_problem(embeddings[: keys.numel()], batch, **arguments)
    return objective(problem, step=step).loss


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one objective at one step size; return its curve of exact diagnostics."""
    torch.set_num_threads(1)
    views, args = job["views"], job["args"]
    encoder = build_encoder(views.shape[-1], args.hidden_dim, args.feature_dim, args.seed)
    name, options = parse_objective_spec(job["objective"])
    objective = build_objective(name, views.shape[0], args.inverse_temperature, seed=args.seed, **options)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=job["learning_rate"])
    curve = []

    def evaluate(iteration: int) -> None:
        diagnostics = global_loss_and_gradient(encoder, views, args.inverse_temperature, embed=encoder, chunk_size=512)
        curve.append(
            {"iteration": iteration, "loss": diagnostics.loss, "grad_norm_squared": diagnostics.gradient_norm_squared}
        )

    start = time.perf_counter()
    evaluate(0)
    per_epoch = views.shape[0] // args.batch_size
    for iteration, batch in enumerate(batch_order(views.shape[0], args.batch_size, args.iterations, args.seed), 1):
        loss = fixed_view_loss(encoder, objective, views, batch, iteration, (iteration - 1) // per_epoch, args.seed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if iteration % args.eval_every == 0 or iteration == args.iterations:
            evaluate(iteration)
    end = curve[-min(FINAL_EVALUATIONS, len(curve) - 1) :]
    return {
        "objective": job["objective"],
        "learning_rate": job["learning_rate"],
        "curve": curve,
        "final_loss": sum(point["loss"] for point in end) / len(end),
        "final_grad_norm_squared": sum(point["grad_norm_squared"] for point in end) / len(end),
        "last_loss": curve[-1]["loss"],
        "last_grad_norm_squared": curve[-1]["grad_norm_squared"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def plot(results: dict[str, dict[str, dict[str, Any]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(results)
    figure, axes = plt.subplots(len(rates), 2, figsize=(11, 3.6 * len(rates)), squeeze=False)
    for row, rate in enumerate(rates):
        for name, run in results[rate].items():
            steps = [point["iteration"] for point in run["curve"]]
            axes[row][0].plot(steps, [point["loss"] for point in run["curve"]], label=name)
            axes[row][1].plot(steps, [point["grad_norm_squared"] for point in run["curve"]], label=name)
        axes[row][0].set_ylabel(f"global loss L (step size {rate})")
        axes[row][1].set_ylabel(f"‖∇L‖² (step size {rate})")
        axes[row][1].set_yscale("log")
        for axis in axes[row]:
            axis.set_xlabel("SGD steps")
            axis.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    figure.suptitle(
        "Exact global contrastive loss (1) and its squared gradient norm, digits (500 × 2 fixed views), b = 4"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        f"| step size | objective | final L | final ‖∇L‖² | last L | last ‖∇L‖² | time (s) |  (final: mean of the "
        f"last {FINAL_EVALUATIONS} evaluations)",
        "|---|---|---|---|---|---|---|",
    ]
    for rate, runs in results.items():
        for name, run in runs.items():
            lines.append(
                f"| {rate} | {name} | {run['final_loss']:.4f} | {run['final_grad_norm_squared']:.4f} | "
                f"{run['last_loss']:.4f} | {run['last_grad_norm_squared']:.4f} | {run['seconds']:.0f} |"
            )
    return "\n".join(lines)


def criteria(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per step size: does the default EMC² end below SogCLR's loss, within SimCLR's + 0.05, and with at most a third
    of SimCLR's squared gradient norm (a small norm at a high loss is a stalled method, not a converged one)?"""
    checks = {}
    for rate, runs in results.items():
        if not {"emc2", "sogclr", "simclr"} <= set(runs):
            continue
        emc2, sogclr, simclr = runs["emc2"], runs["sogclr"], runs["simclr"]
        checks[rate] = {
            "loss_below_sogclr": emc2["final_loss"] < sogclr["final_loss"],
            "loss_within_simclr_plus_0.05": emc2["final_loss"] <= simclr["final_loss"] + 0.05,
            "grad_norm_squared_ratio_to_simclr": emc2["final_grad_norm_squared"] / simclr["final_grad_norm_squared"],
            "grad_norm_squared_at_most_a_third_of_simclr": 3 * emc2["final_grad_norm_squared"]
            <= simclr["final_grad_norm_squared"],
        }
    return checks


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    views = fixed_augmentations(args.num_images, args.image_size, args.seed)
    jobs = [
        {"objective": name, "learning_rate": rate, "views": views, "args": args}
        for rate in args.learning_rates
        for name in args.objectives
    ]
    start = time.perf_counter()
    if args.workers > 1:
        with multiprocessing.get_context("fork").Pool(min(args.workers, len(jobs))) as pool:
            runs = pool.map(train_one, jobs, chunksize=1)
    else:
        runs = [train_one(job) for job in jobs]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        results.setdefault(str(run["learning_rate"]), {})[run["objective"]] = run
    report = {
        "config": {key: value for key, value in vars(args).items()},
        "recommended_learning_rate": RECOMMENDED_LEARNING_RATE,
        "encoder": f"MLP {views.shape[-1]} → {args.hidden_dim} → ReLU → {args.feature_dim}",
        "total_seconds": round(time.perf_counter() - start, 1),
        "criteria": criteria(results),
        "results": results,
    }
    with open(os.path.join(args.output_dir, "convergence.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    plot(results, os.path.join(args.output_dir, "convergence.png"))
    print(table(results))
    for rate, check in report["criteria"].items():
        print(f"step size {rate}: " + ", ".join(f"{key}={value}" for key, value in check.items()))
    print(f"\nTotal {report['total_seconds']:.0f} s; wrote {args.output_dir}/convergence.json and convergence.png")
    return report


if __name__ == "__main__":
    main()
