"""ContrastiveTrainer against a minimal hand-written PyTorch loop doing the same work.

    python benchmarks/trainer_overhead.py --steps 30 --batch_size 32

Both train the same ResNet-18 (32 px digits, ``--objective``, EMC² by default) with the same collator — for EMC²
delivering the chain-state images, which both encode with the views and both write back —, DataLoader settings,
AdamW, clipping at 1.0 and cosine schedule. The time per step is the median interval between consecutive step ends
(data loading included), after warm-up steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback, get_cosine_schedule_with_warmup

from emc2_hf import (
    ContrastiveCollator,
    ContrastiveEncoder,
    ContrastiveEncoderConfig,
    ContrastiveTrainer,
    ContrastiveTrainingArguments,
    SimCLRAugmentation,
    load_digits_dataset,
)
from emc2_hf.data import with_dataset_index
from emc2_hf.objectives import OBJECTIVES, build_objective
from emc2_hf.sampling import ChainStateTable

from common import print_table


class StepEnds(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def median_interval(times: list[float], warmup: int) -> float:
    intervals = [b - a for a, b in zip(times[warmup:], times[warmup + 1 :], strict=False)]
    return statistics.median(intervals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternate trainer/hand loop this many times")
    parser.add_argument("--objective", default="emc2", choices=sorted(OBJECTIVES))
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    train = load_digits_dataset(image_size=32)["train"]
    collator = ContrastiveCollator(
        augmentation=SimCLRAugmentation(image_size=32, crop_scale=(0.5, 1.0), blur_probability=0.0)
    )
    total = args.steps + args.warmup

    def trainer_run() -> float:
        torch.manual_seed(0)
        model = ContrastiveEncoder(ContrastiveEncoderConfig(backbone="resnet18"))
        callback = StepEnds()
        with tempfile.TemporaryDirectory() as output_dir:
            training_args = ContrastiveTrainingArguments(
                output_dir=output_dir,
                per_device_train_batch_size=args.batch_size,
                max_steps=total,
                report_to="none",
                disable_tqdm=True,
                save_strategy="no",
                logging_steps=10,
                use_cpu=True,
                optim="adamw_torch",
                objective=args.objective,
            )
            ContrastiveTrainer(
                model=model, args=training_args, train_dataset=train, data_collator=collator, callbacks=[callback]
            ).train()
        return median_interval(callback.times, args.warmup)

    def hand_run() -> float:
        torch.manual_seed(0)
        model = ContrastiveEncoder(ContrastiveEncoderConfig(backbone="resnet18")).train()
        dataset = with_dataset_index(train, "image", "dataset_index")
        objective = build_objective(args.objective, len(dataset), 5.0)
        hand_collator = dataclasses.replace(collator, seed=0)
        table = None
        if objective.reencodes_chain_states:  # the chain-state images come with the batch, as in the trainer
            table = ChainStateTable(objective.chains)
            hand_collator.attach_chain_states(table, dataset)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=hand_collator
        )
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3
        )
        scheduler = get_cosine_schedule_with_warmup(optimizer, 0, total)
        times, step, epoch = [], 0, 0
        while step < total:
            hand_collator.epoch = epoch
            for batch in loader:
                pixel_values, num_views = batch["pixel_values"], batch["pixel_values"].shape[0]
                arguments = {"view_keys": batch["view_keys"], "view_slots": batch["view_slots"]}
                if table is not None:
                    pixel_values = torch.cat([pixel_values, batch["state_pixel_values"]])
                embeddings = model(pixel_values=pixel_values).embeddings
                if table is not None:
                    arguments.update(
                        state_embeddings=embeddings[num_views:],
                        state_keys=batch["state_index"],
                        state_views=batch["state_view"],
                        start_keys=batch["start_index"],
                        start_views=batch["start_view"],
                    )
                loss = objective(embeddings[:num_views], batch["dataset_index"], step=step, **arguments).loss
                loss.backward()
                if table is not None:
                    table.update(objective.chains, batch["dataset_index"])
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                times.append(time.perf_counter())
                if step == total:
                    break
            epoch += 1
        return median_interval(times, args.warmup)

    results = {"ContrastiveTrainer": [], "hand-written loop": []}
    for _ in range(args.rounds):
        for name, run in (("hand-written loop", hand_run), ("ContrastiveTrainer", trainer_run)):
            start = time.perf_counter()
            results[name].append(run())
            print(
                f"{name}: median step {1e3 * results[name][-1]:.1f} ms ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    hand = statistics.median(results["hand-written loop"])
    rows = [
        [name, f"{1e3 * statistics.median(values):.1f}", f"{statistics.median(values) / hand:.3f}"]
        for name, values in results.items()
    ]
    print_table(
        f"Trainer vs hand-written loop: ResNet-18, 32 px, b = {args.batch_size}, {args.objective}, CPU "
        f"(median step over {args.steps} steps × {args.rounds} rounds)",
        ["loop", "step (ms)", "ratio to hand-written"],
        rows,
        args.output,
    )


if __name__ == "__main__":
    main()
