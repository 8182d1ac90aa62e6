"""The recipes end to end, as a user runs them (python and accelerate launch), on the offline digits data."""

import json
import os
import subprocess
import sys

import pytest

from emc2_hf import ContrastiveEncoder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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
    log = result.stderr + result.stdout
    check_output(tmp_path, log)
    assert "'acceptance_rate'" in result.stdout
    # A log a person reads: no library noise on CPU, one line per event.
    for noise in ("pin_memory", "super().__init__(loader)", "Writing model shards", "MarkovChainState(", "Warning"):
        assert noise not in log, noise
    (start,) = [line for line in log.splitlines() if "Pre-training" in line]
    assert '{"objective": "emc2", "inverse_temperature": 5.0' in start
    assert (tmp_path / "training_curves.png").exists()


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
    from emc2_hf.objectives import OBJECTIVES

    result = run([sys.executable, "recipes/compare.py", *FAST, f"--output_dir={tmp_path}"], tmp_path)
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert [entry["objective"] for entry in comparison["configurations"]] == list(OBJECTIVES)
    assert "| emc2 | 16 | 5 | 1 |" in result.stdout and "| untrained |" in result.stdout
    assert (tmp_path / "comparison.png").exists() and (
        tmp_path / "emc2-b16-beta5-seed42" / "eval_results.json"
    ).exists()


TINY_MODEL = ["--backbone", "test_resnet", "--projection_dim", "16", "--projection_hidden_dim", "16"]
FEW_STEPS = [
    *("--per_device_train_batch_size", "8", "--max_steps", "2", "--burn_in", "3", "--knn_monitor_steps", "1"),
    *("--save_steps", "2", "--logging_steps", "1", "--shots_per_class", "2", "--few_shot_draws", "2"),
    *("--use_cpu", "true"),
    *("--report_to", "none", "--disable_tqdm", "true", "--dataloader_persistent_workers", "false"),
]


def check_recipe_run(output_dir, image_size, optimizer):
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert PROBE_KEYS <= set(results) and results["global_step"] == 2
    config = json.loads((output_dir / "run_config.json").read_text())
    assert config["augmentation"]["image_size"] == image_size and config["optimizer"] == optimizer
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert [log["step"] for log in state["log_history"] if "knn_monitor_accuracy" in log] == [1, 2]
    assert (output_dir / "export" / "model.safetensors").exists()


def test_stl10_preset_runs_on_a_local_copy_in_the_hub_schema(tmp_path):
    from real_schema import make_stl10

    copy = make_stl10(tmp_path / "stl10", num_unlabeled=32, num_train=20, num_test=20)
    output_dir = tmp_path / "run"
    command = [sys.executable, "recipes/stl10.py", "--config", "stl10_b32", "--dataset_name", str(copy)]
    command += [*TINY_MODEL, *FEW_STEPS, "--dataloader_num_workers", "2", "--output_dir", str(output_dir)]
    result = run(command, tmp_path)
    check_recipe_run(output_dir, image_size=96, optimizer="Adam")
    assert "on 32 images of" in result.stderr  # the 'unlabeled' split


@pytest.mark.slow
def test_imagenet100_preset_runs_on_a_copy_in_the_hub_schema(tmp_path):
    from real_schema import make_imagenet100_hub
    from timm.data import ImageNetInfo

    from emc2_hf.data.imagenet100 import imagenet100_classes

    names = [ImageNetInfo().label_name_to_description(wordnet_id) for wordnet_id in imagenet100_classes()]
    copy = make_imagenet100_hub(tmp_path / "imagenet100", names, num_train=2, num_validation=1)
    output_dir = tmp_path / "run"
    command = [sys.executable, "recipes/imagenet100.py", "--config", "imagenet100_b256", "--dataset_name", str(copy)]
    command += [*TINY_MODEL, *FEW_STEPS, "--dataloader_num_workers", "0", "--output_dir", str(output_dir)]
    result = run(command, tmp_path)
    check_recipe_run(output_dir, image_size=224, optimizer="Lars")
    assert "on 200 images of" in result.stderr and "measured on 100 images" in result.stderr


def test_imagenet100_recipe_selects_its_classes_from_a_local_imagenet_folder(tmp_path):
    from real_schema import make_imagenet_folder

    wordnet_ids = ["n02869837", "n01749939", "n02488291", "n01440764", "n01443537"]  # the last two: not ImageNet-100
    copy = make_imagenet_folder(tmp_path / "imagenet", wordnet_ids, num_train=4, num_val=2)
    output_dir = tmp_path / "run"
    command = [sys.executable, "recipes/imagenet100.py", "--dataset_name", str(copy), "--select_imagenet100", "true"]
    command += [*TINY_MODEL, *FEW_STEPS, "--image_size", "64", "--output_dir", str(output_dir)]
    result = run(command, tmp_path)
    assert "Selected the ImageNet-100 classes: 12 training and 6 evaluation images" in result.stderr
    check_recipe_run(output_dir, image_size=64, optimizer="AdamW")


def test_the_small_batch_sgd_preset_uses_two_fixed_augmentations(tmp_path):
    from real_schema import make_stl10

    copy = make_stl10(tmp_path / "stl10", num_unlabeled=32, num_train=20, num_test=20)
    output_dir = tmp_path / "run"
    command = [sys.executable, "recipes/stl10.py", "--config", "stl10_subset_b4_sgd", "--dataset_name", str(copy)]
    command += [*TINY_MODEL, *FEW_STEPS, "--max_train_samples", "16", "--output_dir", str(output_dir)]
    command += ["--per_device_train_batch_size", "4"]
    result = run(command, tmp_path)
    check_recipe_run(output_dir, image_size=96, optimizer="SGD")
    config = json.loads((output_dir / "run_config.json").read_text())
    assert config["data"]["num_augmentations"] == 2 and "on 16 images of" in result.stderr
