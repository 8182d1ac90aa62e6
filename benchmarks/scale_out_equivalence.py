"""How far apart N processes and 1 process end, against the rounding baseline of 1 process with another thread count.

    python benchmarks/scale_out_equivalence.py --objectives emc2 simclr --steps 5 --output results.jsonl

For every objective, ``recipes/stl10.py`` as a user types it (64 digits, a batch-free encoder: GroupNorm and a head
without BatchNorm, plain SGD at 0.05, a global batch of 16 — 4 steps per epoch, so later steps start from the
per-sample state — ``--steps`` steps), or ``--recipe clip_finetune`` (the dual encoder's offline default with a
GroupNorm image tower and the text tower frozen), runs three times: 1 process × 16 with
1 thread, the same with 2 threads (a different summation order and nothing else: the rounding baseline), and
``torchrun --nproc_per_node 2`` × 8. It reports the largest weight difference of each pair, whether the integer
per-sample state (chains' indices and view keys, SogCLR's flags, the cache's positions) is identical, and the largest
per-step loss difference. The thresholds of ``tests/test_scale_out.py`` come from this table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from scale_out import (  # noqa: E402
    checkpoint,
    discrete_state_equal,
    largest_weight_difference,
    losses,
    run_recipe,
)

from emc2_hf.objectives import OBJECTIVES  # noqa: E402

from common import print_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=sorted(OBJECTIVES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--recipe",
        default="stl10",
        choices=["stl10", "clip_finetune"],
        help="clip_finetune: the dual-encoder recipe (image–text; the negative cache is two-view only)",
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    rows = []
    objectives = [
        name for name in args.objectives if args.recipe == "stl10" or not OBJECTIVES[name].reencodes_cache_negatives
    ]
    with tempfile.TemporaryDirectory() as folder:
        for name in objectives:
            base = Path(folder) / name
            one = run_recipe(base / "one", name, steps=args.steps, recipe=args.recipe)
            threads = run_recipe(base / "threads", name, threads=2, steps=args.steps, recipe=args.recipe)
            two = run_recipe(base / "two", name, processes=2, steps=args.steps, recipe=args.recipe)
            reference = checkpoint(one, args.steps)
            loss_one = losses(one, args.steps)
            rows.append(
                [
                    name,
                    f"{largest_weight_difference(reference, checkpoint(threads, args.steps)):.2g}",
                    f"{largest_weight_difference(reference, checkpoint(two, args.steps)):.2g}",
                    str(discrete_state_equal(reference, checkpoint(two, args.steps))),
                    f"{max(abs(a - b) for a, b in zip(loss_one, losses(threads, args.steps), strict=True)):.2g}",
                    f"{max(abs(a - b) for a, b in zip(loss_one, losses(two, args.steps), strict=True)):.2g}",
                ]
            )
    print_table(
        f"recipes/{args.recipe}.py, 1 process × 16 vs 2 threads (rounding baseline) and vs 2 processes × 8, "
        f"{args.steps} SGD steps",
        [
            "objective",
            "max |Δw| 2 threads",
            "max |Δw| 2 processes",
            "integer state identical",
            "max |Δloss| 2 threads",
            "max |Δloss| 2 processes",
        ],
        rows,
        args.output,
    )


if __name__ == "__main__":
    main()
