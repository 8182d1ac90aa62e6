"""recipes/convergence.py (the paper's Fig. 7 on digits) end to end with tiny settings: JSON, PNG and table."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_convergence_recipe_writes_curves_criteria_and_a_plot(tmp_path):
    command = [
        sys.executable,
        "recipes/convergence.py",
        "--output_dir",
        str(tmp_path),
        "--iterations",
        "60",
        "--eval_every",
        "20",
        "--num_images",
        "40",
        "--workers",
        "1",
        "--objectives",
        "emc2",
        "emc2:weighting=samples",
        "sogclr",
        "simclr",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "convergence.json").read_text())
    assert (tmp_path / "convergence.png").stat().st_size > 10_000
    assert report["recommended_learning_rate"] == 0.05 and set(report["results"]) == {"0.05", "0.2"}
    for runs in report["results"].values():
        assert set(runs) == {"emc2", "emc2:weighting=samples", "sogclr", "simclr"}
        for run in runs.values():
            assert [point["iteration"] for point in run["curve"]] == [0, 20, 40, 60]
            assert run["curve"][-1]["loss"] == run["last_loss"]
            # final_* average the last evaluations (here all 3 after the start), not just the last one.
            tail = run["curve"][1:]
            assert abs(run["final_loss"] - sum(p["loss"] for p in tail) / len(tail)) < 1e-9
            assert run["final_grad_norm_squared"] > 0
        # Every objective starts from the same encoder: the same exact loss at step 0.
        assert len({round(run["curve"][0]["loss"], 6) for run in runs.values()}) == 1
    assert set(report["criteria"]["0.05"]) == {
        "loss_below_sogclr",
        "loss_within_simclr_plus_0.05",
        "grad_norm_squared_ratio_to_simclr",
        "grad_norm_squared_at_most_a_third_of_simclr",
    }
    assert "| 0.05 | emc2 |" in result.stdout and "step size 0.05:" in result.stdout


def test_the_convergence_recipe_refuses_an_unknown_variant_in_one_line(tmp_path):
    command = [sys.executable, "recipes/convergence.py", "--output_dir", str(tmp_path), "--objectives", "emc2:x=1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--objectives emc2:x=1:" in result.stderr.strip().splitlines()[-1]
