"""Bias of every objective's estimator against the global contrastive loss (1), with the model held fixed.

    python benchmarks/estimator_bias.py --steps 6000 --gradient_steps 6000

Two yardsticks, both with θ frozen so that nothing but the estimator's own error remains:

1. **Negative weights vs eq. (5)** (``tests/frozen_features.py``): random frozen features for ``m`` images × 2
   fixed views whose features differ (the views of an image are as far apart as two images), batches from an
   epoch-wise shuffle; the weights each anchor view puts on each negative view, averaged over the steps, against the
   softmax over every view of every other image. Mean total variation after ``steps / 4`` and after ``steps``: an
   unbiased estimator halves it (noise ∝ 1/√T), a biased one levels off.
2. **Expected gradient vs ∇L** at the initialisation of the convergence recipe's MLP on the 500 digits × 2 fixed
   augmentations (b = 4, β = 5): the estimator's gradient averaged over ``gradient_steps`` batches (after a burn-in
   of a quarter of them, chains and u evolving, θ fixed) against the exact ∇L
   (:func:`~emc2_hf.evaluation.global_loss_and_gradient`): relative error ``‖E[g] − ∇L‖ / ‖∇L‖``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "recipes"))

from convergence import batch_order, build_encoder, fixed_augmentations, fixed_view_loss  # noqa: E402
from frozen_features import expected_weights_fixed, mean_total_variation, random_fixed_views  # noqa: E402

from emc2_hf.evaluation.diagnostics import global_loss_and_gradient  # noqa: E402
from emc2_hf.objectives import OBJECTIVES, build_objective  # noqa: E402

from common import print_table  # noqa: E402


def weight_bias_rows(objectives: list[str], steps: int, settings: list[tuple[int, int, float]]) -> list[list]:
    rows = []
    for num_images, batch_images, beta in settings:
        views = random_fixed_views(num_images, 2, 16, seed=0, spread=1.0)
        target = views.target(beta)
        for name in objectives:
            late, early = expected_weights_fixed(views, name, beta, batch_images, steps, "epochs", 0, steps // 4)
            early_error, late_error = mean_total_variation(early, target), mean_total_variation(late, target)
            rows.append(
                [
                    f"m={num_images}, b={batch_images}, β={beta}",
                    name,
                    f"{early_error:.3f}",
                    f"{late_error:.3f}",
                    f"{late_error / early_error:.2f}",
                ]
            )
    return rows


def gradient_bias_rows(objectives: list[str], steps: int, num_images: int, beta: float) -> list[list]:
    torch.set_num_threads(1)
    views = fixed_augmentations(num_images, 16, 0)
    encoder = build_encoder(views.shape[-1], 256, 64, seed=0)
    exact = global_loss_and_gradient(encoder, views, beta, embed=encoder, return_gradient=True)
    exact_gradient = torch.cat([g.flatten() for g in exact.gradient])
    rows = []
    for name in objectives:
        objective = build_objective(name, num_images, beta, seed=0)
        total = torch.zeros_like(exact_gradient)
        burn_in = steps // 4
        for step, batch in enumerate(batch_order(num_images, 4, steps, seed=0)):
            loss = fixed_view_loss(encoder, objective, views, batch, step, step // (num_images // 4), seed=0)
            gradient = torch.autograd.grad(loss, list(encoder.parameters()))
            if step >= burn_in:
                total += torch.cat([g.flatten() for g in gradient])
        mean = total / (steps - burn_in)
        error = (mean - exact_gradient).norm() / exact_gradient.norm()
        rows.append([name, f"{error.item():.3f}", f"{exact.loss:.3f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch_only = [name for name, objective in OBJECTIVES.items() if not objective.reencodes_cache_negatives]
    parser.add_argument("--objectives", nargs="+", default=batch_only, choices=batch_only)
    parser.add_argument("--steps", type=int, default=6000, help="batches for the weight comparison")
    parser.add_argument("--gradient_steps", type=int, default=6000, help="batches for the gradient comparison")
    parser.add_argument("--num_images", type=int, default=500, help="digits for the gradient comparison")
    parser.add_argument("--output", default=None, help="append results as JSON lines to this file")
    args = parser.parse_args()
    settings = [(24, 4, 5.0), (24, 8, 14.28)]
    print_table(
        f"Negative weights vs eq. (5), frozen features, 2 distinct fixed views, epoch-wise batches "
        f"({args.steps} steps)",
        ["setting", "objective", f"TV after {args.steps // 4}", f"TV after {args.steps}", "ratio (0.5: noise)"],
        weight_bias_rows(args.objectives, args.steps, settings),
        args.output,
    )
    print_table(
        f"Expected gradient vs exact ∇L, MLP at initialisation, {args.num_images} digits × 2 fixed views, "
        f"b = 4, β = 5 ({args.gradient_steps} batches)",
        ["objective", "relative error ‖E[g] − ∇L‖ / ‖∇L‖", "L(θ₀)"],
        gradient_bias_rows(args.objectives, args.gradient_steps, args.num_images, 5.0),
        args.output,
    )


if __name__ == "__main__":
    main()
