"""Every benchmark script runs (tiny settings) and prints its table."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = {
    "step_time.py": [
        "--batch_sizes",
        "4",
        "--repetitions",
        "1",
        "--backbone",
        "test_resnet",
        "--image_size",
        "16",
        "--dataset_size",
        "40",
    ],
    "batch_selection_cost.py": [
        *("--dataset_sizes", "64", "--batch_size", "8", "--backbone", "test_resnet", "--image_size", "16"),
        *("--repetitions", "1"),
    ],
    "scale_out_equivalence.py": ["--objectives", "simclr", "--steps", "2"],
    "sweep_scaling.py": ["--batch_sizes", "4", "8", "--repetitions", "2", "--dataset_size", "100"],
    "local_anchors.py": ["--num_processes", "1", "2", "--batch_sizes", "4", "--repetitions", "1", "--threads", "1"],
    "state_size.py": ["--dataset_sizes", "100", "1000", "--batch_size", "8", "--repetitions", "2"],
    "trainer_overhead.py": ["--steps", "2", "--warmup", "1", "--batch_size", "8", "--rounds", "1"],
    "augmentation_throughput.py": [
        "--image_size",
        "16",
        "--source_size",
        "16",
        "--num_images",
        "32",
        "--batch_size",
        "8",
        "--workers",
        "0",
        "1",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_runs(script, tmp_path):
    output = tmp_path / "results.jsonl"
    result = subprocess.run(
        [sys.executable, os.path.join("benchmarks", script), *SCRIPTS[script], "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Machine:" in result.stdout and "|---|" in result.stdout
    assert output.read_text().strip()
