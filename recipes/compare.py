"""Run the same pre-training with each objective and print one table of probe accuracies and wall times.

    python recipes/compare.py --dataset_name digits --output_dir runs/compare --per_device_train_batch_size 32 \
        --max_steps 200 --report_to none

Accepts every argument of ``recipes/stl10.py`` (``--objective`` is ignored: all of ``--objectives`` run, each in
``output_dir/<objective>``; ``emc2_exact`` names EMC²'s exact mode, e.g. ``--objectives emc2,emc2_exact,simclr``).
Writes ``output_dir/comparison.json`` and ``output_dir/comparison.md``.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stl10 import main as pretrain  # noqa: E402

OBJECTIVES = ("emc2", "sogclr", "simclr")
VARIANTS = {"emc2_exact": ["--objective", "emc2", "--emc2_exact", "true"]}  # --objectives may also name these
METRICS = ("linear_probe_accuracy", "knn_accuracy", "fewshot_linear_probe_accuracy", "fewshot_knn_accuracy")


def value_of(arguments: list[str], flag: str) -> str | None:
    return arguments[arguments.index(flag) + 1] if flag in arguments else None


def without(arguments: list[str], flag: str) -> list[str]:
    if flag not in arguments:
        return arguments
    position = arguments.index(flag)
    return arguments[:position] + arguments[position + 2 :]


def main() -> None:
    arguments = sys.argv[1:]
    objectives = (value_of(arguments, "--objectives") or ",".join(OBJECTIVES)).split(",")
    arguments = without(without(arguments, "--objectives"), "--objective")
    output_dir = value_of(arguments, "--output_dir") or "runs/compare"
    arguments = without(arguments, "--output_dir")
    rows, untrained = {}, None
    start = time.perf_counter()
    for objective in objectives:
        selection = VARIANTS.get(objective, ["--objective", objective])
        results = pretrain([*arguments, *selection, "--output_dir", os.path.join(output_dir, objective)])
        rows[objective] = {
            **{name: results[f"eval_{name}"] for name in METRICS},
            "train_seconds": results["train_runtime_seconds"],
        }
        untrained = untrained or {name: results[f"untrained_{name}"] for name in METRICS}
    total_seconds = time.perf_counter() - start

    header = "| encoder | LP | 1-NN | 5-shot LP | 5-shot 1-NN | train time (s) |\n|---|---|---|---|---|---|\n"
    lines = [f"| untrained | {' | '.join(f'{untrained[m]:.4f}' for m in METRICS)} | – |"]
    lines += [
        f"| {name} | {' | '.join(f'{row[m]:.4f}' for m in METRICS)} | {row['train_seconds']:.1f} |"
        for name, row in rows.items()
    ]
    table = (
        header + "\n".join(lines) + f"\n\nTotal wall time: {total_seconds:.0f} s; arguments: {' '.join(arguments)}\n"
    )
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "comparison.json"), "w") as handle:
        json.dump(
            {"untrained": untrained, **rows, "total_seconds": total_seconds, "arguments": arguments}, handle, indent=2
        )
    with open(os.path.join(output_dir, "comparison.md"), "w") as handle:
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main()
