"""ContrastiveTrainer end to end on small data: losses, logged metrics, checkpoints with per-sample state."""

import json
import os

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from emc2_hf import (
    ContrastiveCollator,
    ContrastiveEncoder,
    ContrastiveEncoderConfig,
    ContrastiveTrainer,
    ContrastiveTrainingArguments,
    ProbeEvaluator,
    SimCLRAugmentation,
)
from emc2_hf.sampling import PER_SAMPLE_STATE_NAME


def tiny_encoder() -> ContrastiveEncoder:
    torch.manual_seed(0)
    return ContrastiveEncoder(ContrastiveEncoderConfig(backbone="test_resnet", projection_dim=16))


def collator() -> ContrastiveCollator:
    return ContrastiveCollator(augmentation=SimCLRAugmentation(image_size=16, crop_scale=(0.5, 1.0)))


def arguments(tmp_path, **overrides) -> ContrastiveTrainingArguments:
    values = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "max_steps": 4,
        "logging_steps": 2,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    values.update(overrides)
    return ContrastiveTrainingArguments(**values)


class RecordLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("objective", ["emc2", "emc2_in_batch", "sogclr", "simclr", "dcl", "negative_cache"])
def test_each_objective_trains_and_logs(tmp_path, digits, objective):
    records = RecordLogs()
    train = digits["train"].select(range(48))
    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, objective=objective),
        train_dataset=train,
        data_collator=collator(),
        callbacks=[records],
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters(), strict=False))
    loss_logs = [log for log in records.logs if "loss" in log]
    assert len(loss_logs) == 2
    if objective.startswith("emc2"):
        assert all(0.0 < log["acceptance_rate"] <= 1.0 for log in loss_logs)
        fraction = "reencoded_fraction" if objective == "emc2" else "outside_batch_sample_fraction"
        assert all(0.0 <= log[fraction] <= 1.0 for log in loss_logs)
        visited = trainer.objective.chains.state_index != -1
        assert visited.sum().item() == 4 * 8 * 2  # 4 steps × 8 distinct images × 2 views (48 rows, no epoch wrap)
    if objective == "sogclr":
        assert trainer.objective.moving_average.initialised.sum().item() == 32
    if objective == "negative_cache":
        assert bool(trainer.objective.cache.filled.all())  # filled at train begin
        assert all(log["cache_filled_fraction"] == 1.0 for log in loss_logs)


def test_checkpoint_resumes_the_per_sample_state_exactly(tmp_path, digits):
    train = digits["train"].select(range(40))

    class CaptureState(TrainerCallback):
        def __init__(self, objective_holder):
            self.holder, self.states = objective_holder, {}

        def on_step_end(self, args, state, control, **kwargs):
            self.states[state.global_step] = {k: v.clone() for k, v in self.holder[0].objective.state_dict().items()}

    holder = []
    capture = CaptureState(holder)
    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, save_strategy="steps", save_steps=2),
        train_dataset=train,
        data_collator=collator(),
        callbacks=[capture],
    )
    holder.append(trainer)
    trainer.train()
    checkpoint = os.path.join(tmp_path, "checkpoint-2")
    saved = load_file(os.path.join(checkpoint, PER_SAMPLE_STATE_NAME))
    assert set(saved) == {"chains.state_index", "chains.state_view", "chains.state_similarity"}
    for name, value in capture.states[2].items():
        assert torch.equal(saved[name], value), name
    assert not torch.equal(capture.states[2]["chains.state_index"], capture.states[4]["chains.state_index"])

    # A new trainer resumed from step 2 starts training with exactly the step-2 state.
    class StateAtTrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.state = {k: v.clone() for k, v in resumed.objective.state_dict().items()}
            self.step = state.global_step

    at_begin = StateAtTrainBegin()
    resumed = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path / "resumed", max_steps=4),
        train_dataset=train,
        data_collator=collator(),
        callbacks=[at_begin],
    )
    resumed.train(resume_from_checkpoint=checkpoint)
    assert at_begin.step == 2
    for name, value in at_begin.state.items():
        assert torch.equal(value, capture.states[2][name]), name

    # Resuming with another objective or another training set is refused with the reason.
    other = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path / "other", max_steps=2, objective="sogclr"),
        train_dataset=train,
        data_collator=collator(),
    )
    with pytest.raises(ValueError, match="another objective"):
        other.train(resume_from_checkpoint=checkpoint)
    smaller = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path / "smaller", max_steps=2),
        train_dataset=train.select(range(30)),
        data_collator=collator(),
    )
    with pytest.raises(ValueError, match="training set and with the number of fixed augmentations it was written for"):
        smaller.train(resume_from_checkpoint=checkpoint)


def test_sogclr_checkpoint_carries_u(tmp_path, digits):
    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, objective="sogclr", max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=digits["train"].select(range(40)),
        data_collator=collator(),
    )
    trainer.train()
    saved = load_file(os.path.join(tmp_path, "checkpoint-2", PER_SAMPLE_STATE_NAME))
    assert torch.equal(saved["moving_average.log_u"], trainer.objective.moving_average.log_u)
    assert saved["moving_average.initialised"].sum().item() == 16


def test_evaluate_reports_the_four_probe_accuracies(tmp_path, digits):
    data_collator = collator()
    evaluator = ProbeEvaluator(
        train_dataset=digits["train"].select(range(200)),
        test_dataset=digits["test"].select(range(100)),
        pixel_values_fn=data_collator.eval_pixel_values,
        num_draws=2,
    )
    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, max_steps=2),
        train_dataset=digits["train"].select(range(40)),
        data_collator=data_collator,
        probe_evaluator=evaluator,
    )
    metrics = trainer.evaluate()
    assert set(metrics) == {
        "eval_linear_probe_accuracy",
        "eval_knn_accuracy",
        "eval_fewshot_linear_probe_accuracy",
        "eval_fewshot_knn_accuracy",
    }
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert metrics["eval_knn_accuracy"] > 0.3  # far above chance (0.1) even untrained
    # The ProbeCallback evaluates at the end of training.
    trainer.train()
    assert trainer.last_evaluation[0] == 2
    assert any("eval_knn_accuracy" in log for log in trainer.state.log_history)


def test_collator_columns_survive_remove_unused_columns(tmp_path, digits):
    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, max_steps=1, remove_unused_columns=True),
        train_dataset=digits["train"].select(range(16)),
        data_collator=collator(),
    )
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def test_missing_image_column_lists_the_columns(tmp_path, digits):
    renamed = digits["train"].select(range(16)).rename_column("image", "img")
    with pytest.raises(ValueError, match=r"no column 'image'.*\['img', 'label'\]"):
        ContrastiveTrainer(
            model=tiny_encoder(), args=arguments(tmp_path), train_dataset=renamed, data_collator=collator()
        )


def test_streaming_datasets_are_refused_with_the_reason(tmp_path, digits):
    streaming = digits["train"].select(range(16)).to_iterable_dataset()
    with pytest.raises(ValueError, match="map-style dataset"):
        ContrastiveTrainer(
            model=tiny_encoder(), args=arguments(tmp_path), train_dataset=streaming, data_collator=collator()
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"objective": "byol"}, "--objective must be one of"),
        ({"inverse_temperature": -1.0}, "inverse_temperature"),
        ({"num_proposals": 4, "burn_in": 4}, "--burn_in"),
        ({"sogclr_gamma": 1.5}, "sogclr_gamma"),
        ({"per_device_train_batch_size": 1}, "at least 2 images per batch"),
    ],
)
def test_bad_training_arguments_name_the_flag(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        arguments(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("overrides", "rows", "message"),
    [
        ({"burn_in": 100}, 40, r"burn_in \(P = 100\).*2b − 2 = 14 for a batch of b = 8"),
        ({"per_device_train_batch_size": 64}, 48, "the training set has 48 rows but one step takes 64 images"),
        ({"objective": "simclr", "num_proposals": 10}, 40, r"--num_proposals applies to"),
    ],
)
def test_flag_combinations_that_cannot_train_are_refused_before_any_work(tmp_path, digits, overrides, rows, message):
    # Caught when the trainer is built: before data loading, probes or the first step (which would be too late).
    with pytest.raises(ValueError, match=message):
        ContrastiveTrainer(
            model=tiny_encoder(),
            args=arguments(tmp_path, **overrides),
            train_dataset=digits["train"].select(range(rows)),
            data_collator=collator(),
        )


def test_trained_encoder_round_trips_with_from_pretrained(tmp_path, digits):
    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, max_steps=1),
        train_dataset=digits["train"].select(range(16)),
        data_collator=collator(),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "encoder"))
    loaded = ContrastiveEncoder.from_pretrained(str(tmp_path / "encoder")).eval()
    model = trainer.model.eval()
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=pixels).features, loaded(pixel_values=pixels).features, atol=1e-6)
    config = json.loads((tmp_path / "encoder" / "config.json").read_text())
    assert config["backbone"] == "test_resnet" and (tmp_path / "encoder" / "model.safetensors").exists()
    from transformers import AutoModel

    auto = AutoModel.from_pretrained(str(tmp_path / "encoder"))
    assert isinstance(auto, ContrastiveEncoder)


def test_plain_torch_datasets_get_indices(tmp_path, digits):
    rows = [{"image": digits["train"][i]["image"]} for i in range(16)]
    trainer = ContrastiveTrainer(
        model=tiny_encoder(), args=arguments(tmp_path, max_steps=1), train_dataset=rows, data_collator=collator()
    )
    trainer.train()
    assert (trainer.objective.chains.state_index != -1).sum().item() == 16  # 8 images × 2 views
    assert isinstance(datasets.Dataset, type)


@pytest.mark.parametrize(
    "configuration",
    [
        {},
        {"objective": "negative_cache", "cache_refresh_fraction": 0.1},
        {"objective": "simclr", "batch_selection": "spectral_clustering"},
        {"objective": "emc2", "batch_selection": "ordered_sgd", "osgd_candidates": 3},
    ],
    ids=["emc2", "negative_cache", "spectral_clustering", "ordered_sgd"],
)
def test_an_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, digits, configuration):
    # Views are keyed by (seed, epoch, index, view) and the sampler's numbers by (seed, step): resuming from step 3
    # (mid-epoch 0, then across an epoch boundary) reproduces weights and per-sample state (chains, the negative
    # cache and its refresh position) bit for bit; a batch selection's epoch batches come from the checkpoint.
    train = digits["train"].select(range(40))  # 5 steps per epoch at b = 8

    def run(output_dir, resume=None, save_steps=None):
        torch.manual_seed(0)
        overrides = {"max_steps": 7, "learning_rate": 1e-2, **configuration}
        if save_steps:
            overrides.update(save_strategy="steps", save_steps=save_steps)
        trainer = ContrastiveTrainer(
            model=tiny_encoder(),
            args=arguments(output_dir, **overrides),
            train_dataset=train,
            data_collator=collator(),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    uninterrupted = run(tmp_path / "a", save_steps=3)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    for (name, a), b in zip(
        uninterrupted.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    for name, value in uninterrupted.objective.state_dict().items():
        assert torch.equal(value, resumed.objective.state_dict()[name]), name
    if "batch_selection" in configuration:  # the card says how the batches were chosen
        assert configuration["batch_selection"] in resumed.model_card()


def test_global_loss_steps_logs_the_exact_loss_with_fixed_augmentations(tmp_path, digits):
    from emc2_hf.evaluation import global_loss_and_gradient

    train = digits["train"].select(range(24))
    fixed = ContrastiveCollator(
        augmentation=SimCLRAugmentation(image_size=16, crop_scale=(0.5, 1.0)), num_augmentations=2
    )
    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, max_steps=4, logging_steps=1, global_loss_steps=2),
        train_dataset=train,
        data_collator=fixed,
    )
    trainer.train()
    logged = [log for log in trainer.state.log_history if "global_loss" in log]
    assert [log["step"] for log in logged][-2:] == [2, 4]
    # The last value is the exact loss of the final model over the 24 images × 2 fixed augmentations.
    from emc2_hf.data import decode_image

    views = torch.stack(
        [
            torch.stack(
                [fixed.render(decode_image(train[i]["image"]), fixed.fixed_augmentation_key(i, k)) for k in (0, 1)]
            )
            for i in range(24)
        ]
    )
    direct = global_loss_and_gradient(trainer.model, views, trainer.args.inverse_temperature)
    assert logged[-1]["global_loss"] == pytest.approx(direct.loss, rel=1e-5)
    assert logged[-1]["global_gradient_norm_squared"] == pytest.approx(direct.gradient_norm_squared, rel=1e-4)
    with pytest.raises(ValueError, match="--global_loss_steps needs a finite dataset of fixed augmentations"):
        ContrastiveTrainer(
            model=tiny_encoder(),
            args=arguments(tmp_path, global_loss_steps=2),
            train_dataset=train,
            data_collator=collator(),
        )


def test_chain_starts_do_not_depend_on_prefetching_when_a_batch_selection_repeats_examples(tmp_path, digits):
    # Ordered SGD can put an example in consecutive batches; the collator of a prefetched batch then read chain
    # starts the previous step has since moved. The trainer replaces them by the chains' current starts, so 0 and 2
    # DataLoader workers (prefetching 1 and 4 batches ahead) train the same weights and chains.
    train = digits["train"].select(range(24))  # 3 steps per epoch at b = 8: candidates overlap often

    def run(output_dir, workers):
        trainer = ContrastiveTrainer(
            model=tiny_encoder(),
            args=arguments(
                output_dir,
                max_steps=6,
                learning_rate=1e-2,
                batch_selection="ordered_sgd",
                osgd_candidates=3,
                dataloader_num_workers=workers,
            ),
            train_dataset=train,
            data_collator=collator(),
        )
        trainer.train()
        return trainer

    serial, prefetched = run(tmp_path / "a", 0), run(tmp_path / "b", 2)
    for (name, a), b in zip(serial.model.state_dict().items(), prefetched.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(serial.objective.chains.state_index, prefetched.objective.chains.state_index)
