"""The recipe as a user launches it, one process or several: run it, read what its checkpoint holds, compare runs.

Shared by tests/test_scale_out.py and benchmarks/scale_out_equivalence.py (which reports the measured numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 16
STEPS = 6
TRAIN_ROWS = 64
"""4 steps per epoch: steps 5 and 6 start from the chains (re-encoded states, SogCLR's u, the cache) of epoch 1."""

# A batch-free encoder (GroupNorm, a head without BatchNorm) and plain SGD: what N processes × b/N must reproduce
# exactly; small probes so that a run takes seconds.
RECIPE_FLAGS = [
    "--dataset_name", "digits",
    "--max_train_samples", str(TRAIN_ROWS),
    "--backbone_kwargs", '{"norm_layer": "groupnorm"}',
    "--projection_batch_norm", "false",
    "--optim", "sgd",
    "--learning_rate", "0.05",
    "--seed", "1",
    "--dataloader_num_workers", "0",
    "--report_to", "none",
    "--logging_steps", "1",
    "--max_probe_train_samples", "200",
    "--max_eval_samples", "100",
    "--shots_per_class", "2",
    "--few_shot_draws", "1",
]  # fmt: skip


# The dual-encoder recipe's offline default (ResNet-18 image tower, MiniLM text tower, digits captions) with a
# batch-free image tower and the text tower frozen (so it runs in eval mode: no dropout, whose masks depend on how the
# batch is split), plain SGD.
CLIP_RECIPE_FLAGS = [
    "--image_tower_kwargs", '{"norm_layer": "groupnorm"}',
    "--freeze_text_tower", "true",
    "--max_train_rows", str(TRAIN_ROWS),
    "--max_eval_rows", "60",
    "--optim", "sgd",
    "--learning_rate", "0.05",
    "--seed", "1",
    "--dataloader_num_workers", "0",
    "--report_to", "none",
    "--logging_steps", "1",
    "--disable_tqdm", "true",
]  # fmt: skip


def run_recipe(
    output_dir: Path,
    objective: str,
    processes: int = 1,
    threads: int = 1,
    steps: int = STEPS,
    save_steps: int | None = None,
    extra: list[str] | None = None,
    recipe: str = "stl10",
    launcher: str = "torchrun",
) -> Path:
    """``recipes/<recipe>.py`` (``stl10`` or ``clip_finetune``) under ``torchrun --standalone --nproc_per_node
    processes`` (or ``accelerate launch --config_file recipes/accelerate/cpu_2_processes.yaml``) with the global batch
    :data:`GLOBAL_BATCH` split over the processes; returns ``output_dir``."""
    per_device = GLOBAL_BATCH // processes
    arguments = [
        *(RECIPE_FLAGS if recipe == "stl10" else CLIP_RECIPE_FLAGS),
        "--objective", objective,
        "--per_device_train_batch_size", str(per_device),
        "--max_steps", str(steps),
        "--save_strategy", "steps",
        "--save_steps", str(save_steps or steps),
        "--output_dir", str(output_dir),
        *(extra or []),
    ]  # fmt: skip
    binary = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [binary, "--standalone", "--nproc_per_node", str(processes), f"recipes/{recipe}.py", *arguments]
    if launcher == "accelerate":  # without GPUs, accelerate's --multi_gpu path is torchrun (docs/scaling.md)
        accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
        config = ["--config_file", "recipes/accelerate/cpu_2_processes.yaml", "--num_processes", str(processes)]
        command = [accelerate, "launch", *config, f"recipes/{recipe}.py", *arguments]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}")
    return output_dir


def checkpoint(output_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    """Weights (``model.…``) and per-sample state (``state.…``) of ``output_dir/checkpoint-<step>``."""
    folder = output_dir / f"checkpoint-{step}"
    tensors = {f"model.{name}": value for name, value in load_file(str(folder / "model.safetensors")).items()}
    state_file = folder / "per_sample_state.safetensors"
    if state_file.is_file():
        tensors.update({f"state.{name}": value for name, value in load_file(str(state_file)).items()})
    return tensors


def losses(output_dir: Path, step: int = STEPS) -> list[float]:
    """The logged loss of every step (``logging_steps 1``) from the checkpoint's trainer state."""
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def largest_weight_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """``max |w₁ − w₂|`` over every floating-point weight of the two checkpoints."""
    return max(
        float((first[name].double() - second[name].double()).abs().max())
        for name in first
        if name.startswith("model.") and first[name].is_floating_point()
    )


def discrete_state_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    """Whether the integer per-sample state (chains' indices and view keys, SogCLR's flags) is identical."""
    names = [name for name in first if name.startswith("state.") and not first[name].is_floating_point()]
    return all(torch.equal(first[name], second[name]) for name in names)


def largest_state_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """``max |x₁ − x₂|`` over the finite entries of the floating-point per-sample state (0 if there is none)."""
    largest = 0.0
    for name in first:
        if name.startswith("state.") and first[name].is_floating_point():
            a, b = first[name].double(), second[name].double()
            if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
                return float("inf")
            finite = torch.isfinite(a)
            if finite.any():
                largest = max(largest, float((a[finite] - b[finite]).abs().max()))
    return largest
