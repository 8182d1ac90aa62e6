"""recipes/compare.py: a real parser; a grid of objectives, batch sizes, β and seeds; mean ± std, JSON, MD, PNG."""

import importlib.util
import json
import os
import sys

import pytest

from emc2_hf.objectives import OBJECTIVES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    *("--dataset_name", "digits", "--image_size", "16", "--backbone", "test_resnet", "--projection_dim", "16"),
    *("--max_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"),
    *("--max_probe_train_samples", "100", "--max_eval_samples", "50", "--shots_per_class", "1"),
    *("--few_shot_draws", "1", "--per_device_train_batch_size", "8"),
]
NO_BATCH = TINY[: TINY.index("--per_device_train_batch_size")]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_recipe", os.path.join(ROOT, "recipes", "compare.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_recipe"] = module
    spec.loader.exec_module(module)
    return module


def test_output_dir_with_an_equals_sign_is_honoured_and_every_registered_objective_runs(compare, tmp_path):
    options, runs, forwarded = compare.plan_runs([*TINY, f"--output_dir={tmp_path}"])
    assert options.output_dir == str(tmp_path)
    assert [run.objective for run in runs] == list(OBJECTIVES)  # the registry, read at run time
    assert [os.path.basename(run.output_dir) for run in runs] == [f"{name}-b8-beta5-seed42" for name in OBJECTIVES]
    assert all(run.arguments[-2:] == ["--output_dir", run.output_dir] for run in runs)
    assert "--output_dir" not in " ".join(forwarded)


def test_the_grid_is_every_objective_batch_size_beta_and_seed(compare, tmp_path):
    argv = ["--objectives=emc2,simclr", "--seeds", "0,1", "--batch_sizes", "4,8", "--inverse_temperatures=5,14.28"]
    _, runs, _ = compare.plan_runs([*argv, *NO_BATCH, "--output_dir", str(tmp_path)])
    assert len(runs) == 2 * 2 * 2 * 2
    names = {os.path.basename(run.output_dir) for run in runs}
    assert "emc2-b4-beta14.28-seed1" in names and "simclr-b8-beta5-seed0" in names
    run = next(run for run in runs if os.path.basename(run.output_dir) == "emc2-b4-beta14.28-seed1")
    assert run.arguments[-8:-2] == [
        "--seed",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--inverse_temperature",
        "14.28",
    ]


def test_variants_and_registry_names_are_accepted(compare, tmp_path):
    objectives = "emc2:weighting=samples,chain_fraction=0.5,simclr"
    _, runs, _ = compare.plan_runs(["--objectives", objectives, *TINY, "--output_dir", str(tmp_path)])
    assert [run.objective for run in runs] == ["emc2:weighting=samples,chain_fraction=0.5", "simclr"]
    selection = runs[0].arguments[runs[0].arguments.index("--objective") + 1 :][:5]
    assert selection == ["emc2", "--emc2_weighting", "samples", "--emc2_chain_fraction", "0.5"]
    assert os.path.basename(runs[0].output_dir).startswith("emc2-weightingsamples-chain_fraction0.5-b")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--objectives=emc3"], "--objectives: unknown objective 'emc3'; choose from emc2"),
        (["--objective", "simclr"], "--objective is set by compare.py; use --objectives instead"),
        (["--seeds", "1", "--seed", "2"], "--seed is set by compare.py; use --seeds instead"),
        (["--batch_sizes", "4", "--per-device-train-batch-size=4"], "use --batch_sizes instead"),
        (["--seeds", "a,b"], "expected comma-separated integers, got 'a,b'"),
        (["--inverse_temperature", "-2"], "--inverse_temperature (β = 1/τ) must be > 0"),
    ],
)
def test_bad_comparisons_stop_before_any_run_with_one_line(compare, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        compare.plan_runs([*TINY, "--output_dir", str(tmp_path), *argv])
    assert stopped.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and message in error[0], error
    assert not os.listdir(tmp_path)


def test_help_lists_the_grid_flags(compare, capsys):
    with pytest.raises(SystemExit):
        compare.plan_runs(["--help"])
    text = capsys.readouterr().out
    for flag in ("--objectives", "--seeds", "--batch_sizes", "--inverse_temperatures", "--output_dir", "--resume"):
        assert flag in text
    assert ", ".join(OBJECTIVES) in text and "passed to the recipe" in text


def test_the_table_has_mean_and_std_over_seeds_and_one_untrained_row(compare, tmp_path):
    runs = [compare.RunConfig("emc2", 8, 5.0, seed, str(tmp_path / f"emc2-{seed}")) for seed in (0, 1)] + [
        compare.RunConfig("simclr", 8, 5.0, seed, str(tmp_path / f"simclr-{seed}")) for seed in (0, 1)
    ]

    def result(base, untrained):
        values = {f"eval_{name}": base + k / 100 for k, name in enumerate(compare.PROBES)}
        values.update({f"untrained_{name}": untrained for name in compare.PROBES})
        return {**values, "train_runtime_seconds": 10.0 + base}

    summary = compare.aggregate(runs, [result(0.5, 0.3), result(0.7, 0.4), result(0.6, 0.3), result(0.6, 0.4)])
    emc2 = summary["configurations"][0]
    assert emc2["mean"]["linear_probe_accuracy"] == pytest.approx(0.6)
    assert emc2["std"]["linear_probe_accuracy"] == pytest.approx(0.1414, abs=1e-4)  # sample std of 0.5, 0.7
    assert [run["seed"] for run in emc2["runs"]] == [0, 1]
    assert summary["untrained"]["mean"]["knn_accuracy"] == pytest.approx(0.35)
    assert len(summary["untrained"]["runs"]) == 2  # once per seed, not once per configuration
    table = compare.format_table(summary, shots=5)
    assert "| encoder | b | β | seeds | LP | 1-NN | 5-shot LP | 5-shot 1-NN | train time (s) |" in table
    assert "| emc2 | 8 | 5 | 2 | 0.6000 ± 0.1414 |" in table
    assert "| untrained | – | – | 2 | 0.3500 ± 0.0707 |" in table and table.count("untrained") == 1
    png = compare.plot(summary, str(tmp_path / "comparison.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_tiny_comparison_writes_its_json_markdown_and_png(compare, tmp_path):
    summary = compare.main(["--objectives", "emc2,simclr", *TINY, "--output_dir", str(tmp_path)])
    assert [entry["objective"] for entry in summary["configurations"]] == ["emc2", "simclr"]
    written = json.loads((tmp_path / "comparison.json").read_text())
    assert written["grid"] == {
        "objectives": ["emc2", "simclr"],
        "seeds": [42],
        "batch_sizes": [8],
        "inverse_temperatures": [5.0],
    }
    assert written["configurations"][1]["runs"][0]["output_dir"] == str(tmp_path / "simclr-b8-beta5-seed42")
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| simclr | 8 | 5 | 1 |" in markdown and "1-shot LP" in markdown
    assert (tmp_path / "comparison.png").exists()
    # --resume reuses finished configurations instead of training them again.
    again = compare.main(["--objectives", "emc2,simclr", "--resume", *TINY, "--output_dir", str(tmp_path)])
    assert again["configurations"] == summary["configurations"]
