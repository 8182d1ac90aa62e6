"""Compare objectives and batch sizes for CLIP-style fine-tuning at an equal number of pairs seen, over seeds.

Offline default (digits with captions, ResNet-18 image tower + MiniLM, 2 epochs per run, 3 seeds):

    python recipes/clip_compare.py --output_dir runs/clip-compare --objectives emc2,simclr --batch_sizes 8,64

Every run is ``recipes/clip_finetune.py`` with ``--objective O --per_device_train_batch_size B --seed S`` and the
extra flags given after ``--``; each writes its own folder. ``comparison.json`` holds every run's metrics and the mean
± std per (objective, batch size); ``comparison.png`` plots zero-shot top-1 and recall@1 in both directions. A run
whose folder already holds ``eval_results.json`` is read, not retrained: rerun the command to resume a comparison, or
run objectives in parallel invocations on one ``--output_dir`` and rerun with all of them to tabulate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from emc2_hf.finetuning import main as finetune

METRICS = ("zero_shot_top1", "image_to_text_recall@1", "text_to_image_recall@1")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="clip_compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/clip-compare")
    parser.add_argument("--objectives", default="emc2,simclr", help="comma-separated --objective values")
    parser.add_argument("--batch_sizes", default="8,64", help="comma-separated pairs per step")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--num_train_epochs", type=float, default=2.0, help="the same pairs seen at every batch size")
    own, _, extra = " ".join(argv).partition(" -- ")
    return parser.parse_args(own.split() if own else []), extra.split()


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for key in dict.fromkeys((run["objective"], run["batch_size"]) for run in runs):
        group = [run for run in runs if (run["objective"], run["batch_size"]) == key]
        row = {"objective": key[0], "batch_size": key[1], "seeds": len(group)}
        for metric in (*METRICS, "train_runtime_seconds"):
            values = [run["metrics"][f"eval_{metric}" if metric in METRICS else metric] for run in group]
            row[metric] = statistics.mean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["untrained_zero_shot_top1"] = statistics.mean(run["metrics"]["untrained_zero_shot_top1"] for run in group)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.4 * len(METRICS), 3.6), squeeze=False)
    labels = [f"{row['objective']}\nb={row['batch_size']}" for row in rows]
    for axis, metric in zip(axes[0], METRICS, strict=True):
        values = [row[metric] for row in rows]
        bars = axis.bar(labels, values, yerr=[row[f"{metric}_std"] for row in rows], capsize=4)
        axis.bar_label(
            bars, labels=[f"{value:.3f}" for value in values], label_type="center", color="white", fontsize=8
        )
        if metric == "zero_shot_top1":
            axis.axhline(rows[0]["untrained_zero_shot_top1"], color="gray", linestyle="--", label="untrained")
            axis.legend(fontsize=8)
        axis.set_title(metric.replace("_", " "), fontsize=10)
        axis.set_ylim(0, 1)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"mean ± std over {rows[0]['seeds']} seed(s), equal pairs seen", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict]:
    args, extra = parse(list(sys.argv[1:] if argv is None else argv))
    runs = []
    for objective in args.objectives.split(","):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                output_dir = os.path.join(args.output_dir, f"{objective}-b{batch_size}-seed{seed}")
                flags = [
                    "--output_dir", output_dir, "--objective", objective, "--seed", str(seed),
                    "--per_device_train_batch_size", str(batch_size), "--max_steps", "-1",
                    "--num_train_epochs", str(args.num_train_epochs), "--warmup_steps", "0.05",
                    *extra,
                ]  # fmt: skip
                results = os.path.join(output_dir, "eval_results.json")
                if os.path.isfile(results):  # an earlier (or parallel) invocation ran it: reuse, do not retrain
                    with open(results) as handle:
                        metrics = json.load(handle)
                else:
                    metrics = finetune(flags)
                runs.append({"objective": objective, "batch_size": batch_size, "seed": seed, "metrics": metrics})
    rows = summarise(runs)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "comparison.json"), "w") as handle:
        json.dump({"rows": rows, "runs": runs}, handle, indent=1)
    plot(rows, os.path.join(args.output_dir, "comparison.png"))
    for row in rows:
        print(
            f"{row['objective']:>8} b={row['batch_size']:<3} "
            + "  ".join(f"{m} {row[m]:.3f}±{row[m + '_std']:.3f}" for m in METRICS)
            + f"  ({row['train_runtime_seconds']:.0f} s)"
        )
    return rows


if __name__ == "__main__":
    main()
