"""recipes/compare.py: a real parser; a grid of objectives, batch sizes, β and seeds; mean ± std, JSON, MD, PNG."""

import importlib.util
import json
import os
import sys

import pytest

from emc2_hf.objectives import OBJECTIVES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))
import comparison_curves  # noqa: E402

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


# ---------------------------------------------------------------- curves of the 1-NN monitor

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def monitor_history(accuracies, seconds, per_step=8, every=10, evaluations=None):
    """A log history as the trainer writes it: loss logs, the monitor's values every ``every`` steps, an entry of an
    older run without the monitor's time (ignored), and probe evaluations ``{step: accuracy}``."""
    history = [{"loss": 4.0, "step": 5}, {"knn_monitor_accuracy": 0.1, "step": 7}]
    for k, (accuracy, second) in enumerate(zip(accuracies, seconds, strict=True), start=1):
        history.append(
            {
                "loss": 3.0,
                "knn_monitor_accuracy": accuracy,
                "knn_monitor_train_seconds": second,
                "knn_monitor_samples": k * every * per_step,
                "step": k * every,
            }
        )
    for step, accuracy in (evaluations or {}).items():
        history.append({"eval_linear_probe_accuracy": accuracy, "eval_fewshot_linear_probe_accuracy": accuracy / 2})
        history[-1]["step"] = step
    return history


def three_seeds(compare, tmp_path, objective="emc2"):
    return [compare.RunConfig(objective, 8, 5.0, seed, str(tmp_path / f"{objective}-{seed}")) for seed in (0, 1, 2)]


def test_monitor_points_are_extracted_and_averaged_over_three_seeds_at_each_step(compare, tmp_path):
    runs = three_seeds(compare, tmp_path)
    histories = [
        monitor_history([0.5, 0.6], [1.0, 3.0], evaluations={15: 0.8, 20: 0.9}),
        monitor_history([0.6, 0.8], [2.0, 4.0], evaluations={15: 0.7, 20: 0.9}),
        monitor_history([0.7, 0.7], [3.0, 8.0], evaluations={15: 0.6, 20: 0.9}),
    ]
    untrained = {"untrained_linear_probe_accuracy": 0.3, "untrained_fewshot_linear_probe_accuracy": 0.2}
    curves = comparison_curves.aggregate_curves(runs, histories, [untrained] * 3)
    (entry,) = curves["configurations"]
    assert curves["missing"] == [] and [run["seed"] for run in entry["runs"]] == [0, 1, 2]
    assert entry["runs"][0]["knn_monitor"] == [
        {"step": 10, "samples": 80, "train_seconds": 1.0, "accuracy": 0.5},
        {"step": 20, "samples": 160, "train_seconds": 3.0, "accuracy": 0.6},
    ]  # the older entry without the monitor's time (step 7) is left out
    first, second = entry["knn_monitor"]
    # step 10: accuracies 0.5, 0.6, 0.7 → 0.6 ± 0.1; seconds 1, 2, 3 → 2 ± 1
    assert (first["step"], first["samples"], first["seeds"]) == (10, 80, 3)
    assert first["accuracy_mean"] == pytest.approx(0.6) and first["accuracy_std"] == pytest.approx(0.1)
    assert first["train_seconds_mean"] == pytest.approx(2.0) and first["train_seconds_std"] == pytest.approx(1.0)
    # step 20: accuracies 0.6, 0.8, 0.7 → 0.7 ± 0.1; seconds 3, 4, 8 → 5 ± sqrt(((−2)² + (−1)² + 3²) / 2) = √7
    assert second["accuracy_mean"] == pytest.approx(0.7) and second["accuracy_std"] == pytest.approx(0.1)
    assert second["train_seconds_mean"] == pytest.approx(5.0)
    assert second["train_seconds_std"] == pytest.approx(7**0.5)
    # The probes: the untrained encoder at step 0, then the evaluations; their time interpolated from the monitor's.
    probes = entry["runs"][0]["probes"]["linear_probe_accuracy"]
    assert [(p["step"], p["samples"], p["train_seconds"], p["accuracy"]) for p in probes] == [
        (0, 0, 0.0, 0.3),
        (15, 120, 2.0, 0.8),  # halfway between 1 s (step 10) and 3 s (step 20)
        (20, 160, 3.0, 0.9),
    ]
    mean = entry["probes"]["linear_probe_accuracy"]
    assert [p["step"] for p in mean] == [0, 15, 20]
    assert mean[1]["accuracy_mean"] == pytest.approx(0.7) and mean[1]["accuracy_std"] == pytest.approx(0.1)
    assert comparison_curves.has_probe_curves(curves)


def test_probe_times_past_the_last_monitor_point_follow_its_last_rate(compare):
    monitor = comparison_curves.monitor_points(monitor_history([0.5, 0.6], [1.0, 3.0]))
    history = [{"eval_linear_probe_accuracy": 0.9, "step": 25}]
    (point,) = comparison_curves.probe_points(history, monitor)["linear_probe_accuracy"]
    assert (point["step"], point["samples"], point["train_seconds"]) == (25, 200, 4.0)  # 3 s + 5 steps × 0.2 s


def test_the_log_history_is_read_back_from_training_curves_json_or_a_checkpoint(compare, tmp_path):
    from emc2_hf.pretraining.plots import plot_training_curves

    history = monitor_history([0.5, 0.6], [1.0, 3.0], evaluations={20: 0.9})
    plot_training_curves(history, str(tmp_path / "run"))
    read = comparison_curves.read_log_history(str(tmp_path / "run"))
    assert comparison_curves.monitor_points(read) == comparison_curves.monitor_points(history)
    assert {"eval_linear_probe_accuracy": 0.9, "step": 20}.items() <= next(e for e in read if e["step"] == 20).items()
    checkpoint = tmp_path / "saved" / "checkpoint-20"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert comparison_curves.read_log_history(str(tmp_path / "saved")) == history
    assert comparison_curves.read_log_history(str(tmp_path / "nothing")) is None


def _png_width(path):
    data = open(path, "rb").read(24)
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big")


def _write_runs(runs, histories):
    from emc2_hf.pretraining.plots import plot_training_curves

    for run, history in zip(runs, histories, strict=True):
        plot_training_curves(history, run.output_dir)


def test_the_curve_pngs_are_written_with_a_probe_panel_only_when_probes_ran_during_training(compare, tmp_path):
    runs = three_seeds(compare, tmp_path) + three_seeds(compare, tmp_path, "simclr")
    _write_runs(runs, [monitor_history([0.5, 0.6 + k / 100], [1.0, 3.0 + k]) for k in range(6)])
    written = comparison_curves.write_curves(runs, str(tmp_path / "one"))
    assert [os.path.basename(path) for path in written] == [
        "comparison_curves.json",
        "comparison_vs_samples.png",
        "comparison_vs_time.png",
    ]
    curves = json.loads((tmp_path / "one" / "comparison_curves.json").read_text())
    assert [entry["objective"] for entry in curves["configurations"]] == ["emc2", "simclr"]
    assert not comparison_curves.has_probe_curves(curves)  # the final evaluation alone is no curve
    one_panel = _png_width(written[1])
    _write_runs(runs, [monitor_history([0.5, 0.6], [1.0, 3.0], evaluations={10: 0.7, 20: 0.8})] * 6)
    written = comparison_curves.write_curves(runs, str(tmp_path / "two"))
    assert _png_width(written[1]) > 1.5 * one_panel and _png_width(written[2]) > 1.5 * one_panel


def test_runs_without_the_monitor_skip_the_curves_with_one_message(compare, tmp_path, capsys):
    runs = three_seeds(compare, tmp_path)
    _write_runs(runs, [[{"loss": 3.0, "step": 1}]] * 3)
    (tmp_path / "comparison_vs_time.png").write_bytes(PNG_MAGIC)  # from an earlier comparison
    assert comparison_curves.write_curves(runs, str(tmp_path)) == []
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "without --knn_monitor_steps" in lines[0] and "comparison_vs_time.png" in lines[0]
    assert not any(name.startswith("comparison_") for name in os.listdir(tmp_path))


def test_objectives_all_expands_to_the_registry_read_at_run_time(compare, tmp_path, monkeypatch):
    _, runs, _ = compare.plan_runs(["--objectives", "all", *TINY, "--output_dir", str(tmp_path)])
    assert [run.objective for run in runs] == list(OBJECTIVES)
    assert compare.expand_objectives(["all", "emc2:weighting=samples", "simclr"]) == [
        *OBJECTIVES,
        "emc2:weighting=samples",
    ]
    monkeypatch.setitem(OBJECTIVES, "registered_later", OBJECTIVES["simclr"])
    assert compare.expand_objectives(["all"])[-1] == "registered_later"


def _flag(run, name):
    return run.arguments[run.arguments.index(name) + 1] if name in run.arguments else None


def test_knn_monitor_steps_defaults_to_max_steps_over_the_points_unless_given(compare, tmp_path):
    base = [*NO_BATCH[: NO_BATCH.index("--max_steps")], "--objectives", "simclr", "--output_dir", str(tmp_path)]
    _, (run,), _ = compare.plan_runs([*base, "--max_steps", "40"])
    assert _flag(run, "--knn_monitor_steps") == "4"  # 40 // 10
    _, (run,), _ = compare.plan_runs([*base, "--max_steps", "40", "--knn_monitor_points", "20"])
    assert _flag(run, "--knn_monitor_steps") == "2"
    _, (run,), _ = compare.plan_runs([*base, "--max_steps", "40", "--knn_monitor_steps", "7"])
    assert run.arguments.count("--knn_monitor_steps") == 1 and _flag(run, "--knn_monitor_steps") == "7"


def test_the_stl10_b32_comparison_preset_is_one_short_command(compare, capsys):
    options, runs, forwarded = compare.plan_runs(["--config", "stl10_b32"])
    assert options.objectives == list(OBJECTIVES) and options.seeds == [0, 1, 2]
    assert len(runs) == 3 * len(OBJECTIVES) and {run.batch_size for run in runs} == {32}
    assert {run.inverse_temperature for run in runs} == {14.28}
    assert forwarded[:2] == ["--config", "stl10_b32"]  # the recipe's own preset for the rest
    assert {_flag(run, "--knn_monitor_steps") for run in runs} == {"15625"}  # 312,500 steps / 20 points
    emc2 = next(run for run in runs if run.objective == "emc2")
    simclr = next(run for run in runs if run.objective == "simclr")
    assert emc2.recipe_config is None and _flag(emc2, "--config") == "stl10_b32"
    # the recipe preset's EMC² burn-in is left out for the objectives that refuse it
    assert "burn_in" not in simclr.recipe_config and simclr.recipe_config["learning_rate"] == 1e-4
    assert _flag(simclr, "--config") == os.path.join(simclr.output_dir, "recipe_config.yaml")
    assert "simclr: leaving out burn_in=31" in capsys.readouterr().err
    # flags given beside it win
    options, runs, _ = compare.plan_runs(
        ["--config=stl10_b32", "--objectives", "emc2,simclr", "--seeds", "0", "--max_steps", "100"]
    )
    assert [run.objective for run in runs] == ["emc2", "simclr"]
    assert {_flag(run, "--knn_monitor_steps") for run in runs} == {"5"}
    steps = [runs[0].arguments[k + 1] for k, token in enumerate(runs[0].arguments) if token == "--max_steps"]
    assert steps == ["312500", "100"]  # the preset's, then the command line's, which the recipe's parser keeps


def test_a_recipe_config_file_stays_the_recipes_and_loses_other_objectives_options(compare, tmp_path):
    path = os.path.join(ROOT, "recipes", "presets", "stl10_b32.yaml")  # it sets output_dir, a key both parsers have
    options, runs, forwarded = compare.plan_runs(["--config", path, "--objectives", "emc2,sogclr", "--seeds", "0"])
    assert options.config is None and forwarded[:2] == ["--config", path]
    assert runs[0].recipe_config is None and runs[1].recipe_config["backbone"] == "resnet18"
    assert "burn_in" not in runs[1].recipe_config


def test_a_recipe_objective_option_for_every_objective_stops_the_comparison_at_once(compare, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        compare.plan_runs(["--objectives=emc2,simclr", "--burn_in", "3", *TINY, "--output_dir", str(tmp_path)])
    assert stopped.value.code == 2
    assert "simclr: --burn_in applies to the objective(s)" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_a_tiny_two_seed_comparison_writes_both_curve_pngs(compare, tmp_path):
    tiny = list(TINY)
    tiny[tiny.index("--max_steps") + 1] = "6"
    compare.main(
        [
            "--objectives",
            "emc2,simclr",
            "--seeds",
            "0,1",
            "--knn_monitor_steps",
            "3",
            *tiny,
            f"--output_dir={tmp_path}",
        ]
    )
    curves = json.loads((tmp_path / "comparison_curves.json").read_text())
    emc2 = curves["configurations"][0]
    assert [run["seed"] for run in emc2["runs"]] == [0, 1]
    points = emc2["runs"][1]["knn_monitor"]
    assert [(point["step"], point["samples"]) for point in points] == [(3, 24), (6, 48)]
    assert 0 < points[0]["train_seconds"] < points[1]["train_seconds"]
    assert [point["seeds"] for point in emc2["knn_monitor"]] == [2, 2]
    assert [point["step"] for point in emc2["probes"]["linear_probe_accuracy"]] == [0, 6]  # untrained, final
    for name in ("comparison_vs_samples.png", "comparison_vs_time.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert "comparison_vs_time.png" in (tmp_path / "comparison.md").read_text()


def test_the_monitor_logs_training_seconds_without_its_own_and_the_evaluations_time(monkeypatch):
    from types import SimpleNamespace

    from transformers import TrainerControl

    from emc2_hf.evaluation import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])

    class SlowEvaluator:
        def knn(self, encoder, device=None):
            clock[0] += 5.0  # the monitor's own measurement
            return 0.5

    monitor = callbacks.KNNMonitorCallback(SlowEvaluator(), every_n_steps=2)
    args = SimpleNamespace(
        device=SimpleNamespace(type="cpu"), per_device_train_batch_size=8, world_size=1, gradient_accumulation_steps=2
    )
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, log_history=[])
    control = TrainerControl()
    monitor.on_train_begin(args, state, control)
    logged = []
    for step in range(1, 5):
        clock[0] += 1.0  # one second of training per step
        state.global_step = step
        monitor.on_step_end(args, state, control, model=object())
        if pending := monitor.pop_pending():
            logged.append(pending)
            monitor.on_log(args, state, control, logs={"loss": 1.0, **pending})
            clock[0] += 3.0  # an evaluation after the log (e.g. eval_strategy="steps")
            monitor.on_evaluate(args, state, control)
    assert logged == [
        {"knn_monitor_accuracy": 0.5, "knn_monitor_train_seconds": 2.0, "knn_monitor_samples": 32},
        {"knn_monitor_accuracy": 0.5, "knn_monitor_train_seconds": 4.0, "knn_monitor_samples": 64},
    ]
    # A resumed run continues from the seconds it logged last.
    state.log_history = [{"step": 4, **logged[-1]}]
    monitor.on_train_begin(args, state, control)
    clock[0] += 1.0
    assert monitor.train_seconds() == pytest.approx(5.0)
