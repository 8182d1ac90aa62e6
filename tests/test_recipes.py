"""The recipes end to end, as a user runs them (python and accelerate launch), on the offline digits data."""

import json
import os
import subprocess
import sys

import pytest

from emc2_hf import ContrastiveEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = [
    "--dataset_name",
    "digits",
    "--image_size",
    "16",
    "--backbone",
    "test_resnet",
    "--projection_dim",
    "16",
    "--per_device_train_batch_size",
    "16",
    "--max_steps",
    "3",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--use_cpu",
    "true",
    "--save_steps",
    "3",
    "--logging_steps",
    "1",
]
PROBE_KEYS = {
    "eval_linear_probe_accuracy",
    "eval_knn_accuracy",
    "eval_fewshot_linear_probe_accuracy",
    "eval_fewshot_knn_accuracy",
}


def run(command, tmp_path, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def check_output(output_dir, log):
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert PROBE_KEYS <= set(results)
    assert all(0.0 <= results[key] <= 1.0 for key in PROBE_KEYS)
    assert {f"untrained_{key[5:]}" for key in PROBE_KEYS} <= set(results)
    assert results["global_step"] == 3
    assert "Probe accuracy before training" in log and "Probe accuracy after 3 steps" in log
    assert (output_dir / "checkpoint-3" / "per_sample_state.safetensors").exists()
    ContrastiveEncoder.from_pretrained(str(output_dir))


def test_stl10_recipe_runs_offline_on_digits(tmp_path):
    result = run([sys.executable, "recipes/stl10.py", *FAST, "--output_dir", str(tmp_path)], tmp_path)
    check_output(tmp_path, result.stderr + result.stdout)
    assert "'acceptance_rate'" in result.stdout


def test_stl10_recipe_under_accelerate_launch(tmp_path):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [
        accelerate,
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "recipes/stl10.py",
        *FAST,
        "--output_dir",
        str(tmp_path),
    ]
    result = run(command, tmp_path)
    check_output(tmp_path, result.stderr + result.stdout)


def test_missing_hub_dataset_offline_says_what_to_do(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "recipes/stl10.py",
            *FAST,
            "--dataset_name",
            "someone/not-a-dataset",
            "--output_dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Could not load dataset 'someone/not-a-dataset'" in result.stderr
    assert "local copy" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_compare_recipe_runs_every_objective(tmp_path):
    result = run([sys.executable, "recipes/compare.py", *FAST, "--output_dir", str(tmp_path)], tmp_path)
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert {"untrained", "emc2", "sogclr", "simclr"} <= set(comparison)
    assert "| emc2 |" in result.stdout
