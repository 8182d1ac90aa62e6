"""Loading the paper's datasets, their augmentations, presets, optimisers and monitoring (issue: recipes for real)."""

import os
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from timm.data import ImageNetInfo
from timm.optim import Lars

from emc2_hf import ContrastiveCollator, ContrastiveTrainer, SimCLRAugmentation
from emc2_hf.data.imagenet100 import imagenet1k_wordnet_ids, imagenet100_classes, select_imagenet100
from emc2_hf.data.sources import DatasetUnavailableError, load_image_split
from emc2_hf.evaluation import KNNMonitorCallback, ProbeEvaluator, knn_accuracy
from emc2_hf.pretraining import DataArguments, build_augmentation, load_config, load_splits, parse_recipe_arguments
from emc2_hf.training.optimizers import create_timm_optimizer

sys.path.insert(0, os.path.dirname(__file__))
from real_schema import STL10_CLASSES, make_imagenet_folder, make_stl10  # noqa: E402
from test_trainer import RecordLogs, arguments, collator, tiny_encoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "recipes" / "presets"


@pytest.fixture(scope="module")
def stl10_copy(tmp_path_factory):
    return make_stl10(tmp_path_factory.mktemp("stl10"), num_unlabeled=24, num_train=20, num_test=20)


# ---------------------------------------------------------------- loading


def test_a_local_stl10_copy_loads_every_split_in_the_hub_schema(stl10_copy):
    unlabeled = load_image_split(str(stl10_copy), "unlabeled", image_column="image")
    train = load_image_split(str(stl10_copy), "train")
    both = load_image_split(str(stl10_copy), "unlabeled+train")
    assert (len(unlabeled), len(train), len(both)) == (24, 20, 44)
    assert train.features["label"].names == STL10_CLASSES
    image = train.cast_column("image", datasets.Image())[0]["image"]
    assert image.size == (96, 96) and image.mode == "RGB"


def test_save_to_disk_copies_load_and_concatenate_splits(stl10_copy, tmp_path):
    saved = datasets.DatasetDict(
        {split: load_image_split(str(stl10_copy), split) for split in ("unlabeled", "train", "test")}
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    assert len(load_image_split(str(tmp_path / "saved"), "unlabeled+train")) == 44
    with pytest.raises(DatasetUnavailableError, match=r"no split 'validation'.*\['unlabeled', 'train', 'test'\]"):
        load_image_split(str(tmp_path / "saved"), "validation")


def test_a_missing_split_or_column_names_what_exists(stl10_copy):
    with pytest.raises(DatasetUnavailableError, match=r"no split 'validation'.*--eval_split"):
        load_image_split(str(stl10_copy), "validation")
    with pytest.raises(DatasetUnavailableError, match=r"no column 'img'.*\['image', 'label'\].*--image_column"):
        load_image_split(str(stl10_copy), "train", image_column="img")


def test_an_unreachable_hub_dataset_says_which_name_and_how_to_use_a_local_copy():
    with pytest.raises(DatasetUnavailableError) as error:
        load_image_split("jxie/stl10", "unlabeled")
    message = str(error.value)
    assert "'jxie/stl10'" in message and "'unlabeled'" in message
    assert "save_to_disk" in message and "--dataset_name DIR" in message and "digits" in message


# ---------------------------------------------------------------- ImageNet-100


def test_the_imagenet100_class_list_is_the_cmc_subset_of_imagenet_1k():
    classes = imagenet100_classes()
    assert len(classes) == len(set(classes)) == 100
    assert set(classes) <= set(imagenet1k_wordnet_ids())
    assert classes[:3] == ("n02869837", "n01749939", "n02488291")  # bonnet, green mamba, langur (CMC order)
    assert ImageNetInfo().label_name_to_description("n01749939") == "green mamba"


def test_imagenet100_is_selected_from_imagenet_1k_labels():
    wordnet_ids = imagenet1k_wordnet_ids()
    labels = list(range(1000)) * 2
    names = [f"{ImageNetInfo().index_to_description(k)} #{k}" for k in range(1000)]  # unique, human-readable
    dataset = datasets.Dataset.from_dict(
        {"label": labels, "row": list(range(2000))},
        features=datasets.Features({"label": datasets.ClassLabel(names=names), "row": datasets.Value("int64")}),
    )
    selected = select_imagenet100(dataset)
    kept_ids = {wordnet_ids[label] for label in selected["label"]}
    assert len(selected) == 200 and kept_ids == set(imagenet100_classes())
    assert selected["row"] == sorted(selected["row"])  # source order kept


def test_imagenet100_is_selected_from_a_local_imagenet_folder(tmp_path):
    inside, outside = ["n02869837", "n01749939"], ["n01440764", "n01443537"]  # tench, goldfish are not in it
    root = make_imagenet_folder(tmp_path / "imagenet", inside + outside, num_train=2, num_val=1)
    validation = load_image_split(str(root), "validation")
    selected = select_imagenet100(validation)
    names = validation.features["label"].names
    assert sorted(names[label] for label in selected["label"]) == sorted(inside)


def test_selecting_imagenet100_from_other_data_explains_what_it_needs():
    dataset = datasets.Dataset.from_dict(
        {"label": [0, 1]}, features=datasets.Features({"label": datasets.ClassLabel(names=["cat", "dog"])})
    )
    with pytest.raises(ValueError, match="not WordNet ids.*--select_imagenet100 false"):
        select_imagenet100(dataset)
    with pytest.raises(ValueError, match="no column 'fine_label'"):
        select_imagenet100(dataset, "fine_label")


def test_load_splits_selects_imagenet100_when_the_data_has_more_classes(tmp_path):
    root = make_imagenet_folder(tmp_path / "imagenet", ["n02869837", "n01440764"], num_train=2, num_val=2)
    data_args = DataArguments(
        dataset_name=str(root), train_split="train", probe_train_split="train", eval_split="validation"
    )
    # Only 2 classes here, so the automatic rule (> 100 classes) keeps everything; forcing it selects.
    _, _, evaluation = load_splits(data_args, seed=0, default_select_imagenet100=True)
    assert len(evaluation) == 4
    data_args.select_imagenet100 = True
    train, probe_train, evaluation = load_splits(data_args, seed=0)
    assert (len(train), len(probe_train), len(evaluation)) == (2, 2, 2)


# ---------------------------------------------------------------- augmentations


def test_augmentation_presets_are_the_papers():
    stl10 = SimCLRAugmentation.from_preset("stl10")
    assert (stl10.image_size, stl10.crop_scale, stl10.horizontal_flip_probability) == (96, (0.08, 1.0), 0.5)
    assert (stl10.brightness, stl10.contrast, stl10.saturation, stl10.hue) == (0.8, 0.8, 0.8, 0.2)
    assert (stl10.color_jitter_probability, stl10.grayscale_probability, stl10.blur_sigma) == (0.8, 0.2, (0.1, 2.0))
    imagenet = SimCLRAugmentation.from_preset("imagenet100")
    assert (imagenet.image_size, imagenet.crop_scale) == (224, (0.08, 1.0))
    assert (imagenet.brightness, imagenet.contrast, imagenet.saturation, imagenet.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (imagenet.color_jitter_probability, imagenet.grayscale_probability) == (0.8, 0.2)
    assert SimCLRAugmentation.from_preset("stl10", image_size=64).image_size == 64
    with pytest.raises(ValueError, match="unknown augmentation preset 'cifar'"):
        SimCLRAugmentation.from_preset("cifar")
    with pytest.raises(ValueError, match=r"no field\(s\) \['size'\]"):
        SimCLRAugmentation.from_preset("stl10", size=3)


def test_recipe_augmentation_overrides_apply_on_top_of_the_preset():
    augmentation = build_augmentation(
        DataArguments(dataset_name="x", crop_scale_min=0.2, color_jitter_strength=0.5, blur_probability=0.0), "stl10"
    )
    assert augmentation.crop_scale == (0.2, 1.0) and augmentation.blur_probability == 0.0
    assert (augmentation.brightness, augmentation.hue) == (0.4, 0.1)
    assert build_augmentation(DataArguments(), "stl10").image_size == 32  # digits keeps its own preset


def test_views_come_out_at_the_presets_sizes(stl10_copy):
    rows = load_image_split(str(stl10_copy), "train").select(range(4))
    rows = rows.add_column("dataset_index", list(range(4)))
    for preset, size in (("stl10", 96), ("imagenet100", 224)):
        batch = ContrastiveCollator(augmentation=SimCLRAugmentation.from_preset(preset), seed=0)(list(rows))
        assert batch["pixel_values"].shape == (8, 3, size, size)


def test_fixed_augmentations_repeat_every_epoch_and_fresh_ones_do_not(digits):
    rows = [{"image": digits["train"][k]["image"], "dataset_index": k} for k in range(3)]
    augmentation = SimCLRAugmentation(image_size=16, crop_scale=(0.3, 1.0))
    fixed = ContrastiveCollator(augmentation=augmentation, seed=0, num_augmentations=2)
    fresh = ContrastiveCollator(augmentation=augmentation, seed=0)
    epoch0 = fixed(rows)["pixel_values"]
    fixed.epoch = fresh.epoch = 5
    assert torch.equal(fixed(rows)["pixel_values"], epoch0)
    assert not torch.equal(epoch0[:3], epoch0[3:])  # the two views are different augmentations
    assert not torch.equal(fresh(rows)["pixel_values"], epoch0)
    # With |A| = 3, every view is one of the image's 3 fixed augmentations, and the pair differs.
    three = ContrastiveCollator(augmentation=augmentation, seed=0, num_augmentations=3)
    views = set()
    for epoch in range(8):
        three.epoch = epoch
        pixels = three(rows)["pixel_values"]
        assert not torch.equal(pixels[0], pixels[3])
        views.update({pixels[0].numpy().tobytes(), pixels[3].numpy().tobytes()})
    assert len(views) == 3
    with pytest.raises(ValueError, match="num_augmentations=1 cannot give two different views"):
        ContrastiveCollator(num_augmentations=1)


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", sorted(path.stem for path in PRESETS.glob("*.yaml")))
def test_every_preset_parses_into_the_recipe_arguments(preset):
    data_args, model_args, training_args = parse_recipe_arguments(
        ["--config", preset, "--output_dir", "/tmp/unused", "--use_cpu", "true"], presets_dir=str(PRESETS)
    )
    values = yaml.safe_load((PRESETS / f"{preset}.yaml").read_text())
    assert training_args.per_device_train_batch_size == values["per_device_train_batch_size"]
    assert training_args.inverse_temperature == values["inverse_temperature"]
    assert training_args.burn_in == values["burn_in"] == 2 * values["per_device_train_batch_size"] // 2 - 1
    assert model_args.backbone == values["backbone"]
    assert data_args.dataset_name == values["dataset_name"]
    assert training_args.output_dir == "/tmp/unused"  # the command line wins over the file


def test_presets_are_table_3_of_the_paper():
    rows = {
        "stl10_b32": ("resnet18", 14.28, 32, 1e-4, 512, 1e-4, 31),
        "stl10_b256": ("resnet18", 5.0, 256, 1e-3, 512, 1e-4, 255),
        "imagenet100_b256": ("resnet50", 14.28, 256, 1.2, 128, 1e-6, 255),
        "stl10_subset_b4_sgd": ("resnet18", 5.0, 4, 1e-3, 512, 1e-4, 3),
    }
    for name, row in rows.items():
        values = load_config(str(PRESETS / f"{name}.yaml"))
        keys = ("backbone", "inverse_temperature", "per_device_train_batch_size", "learning_rate")
        keys += ("projection_dim", "weight_decay", "burn_in")
        assert tuple(values[key] for key in keys) == row, name
    assert load_config(str(PRESETS / "imagenet100_b256.yaml"))["timm_optimizer"] == "lars"
    assert load_config(str(PRESETS / "stl10_b32.yaml"))["timm_optimizer"] == "adam"
    assert load_config(str(PRESETS / "stl10_subset_b4_sgd.yaml"))["optim"] == "sgd"


def test_a_config_file_with_an_unknown_key_or_a_missing_preset_is_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("inverse_temprature: 5\n")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['inverse_temprature'\]"):
        parse_recipe_arguments(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(FileNotFoundError, match="stl10_b32.yaml"):
        parse_recipe_arguments(["--config", "stl10_b64"], presets_dir=str(PRESETS))


# ---------------------------------------------------------------- optimisers


def test_lars_adapts_weights_only_and_decays_weights_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    optimizer = create_timm_optimizer(model, "lars", learning_rate=0.5, weight_decay=0.01, trust_coefficient=1e-3)
    assert isinstance(optimizer, Lars)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 5)).square().sum().backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    weight, weight_grad = before[0], grads[0]
    # LARS (You et al., 2017): trust ratio η‖w‖ / (‖g‖ + λ‖w‖) on (g + λw); first step: momentum buffer = update.
    ratio = 1e-3 * weight.norm() / (weight_grad.norm() + 0.01 * weight.norm())
    expected = weight - 0.5 * ratio * (weight_grad + 0.01 * weight)
    torch.testing.assert_close(model[0].weight.detach(), expected)
    for parameter, old, grad in zip(list(model.parameters())[1:], before[1:], grads[1:], strict=True):
        torch.testing.assert_close(parameter.detach(), old - 0.5 * grad)  # bias, BN weight/bias: plain SGD step


def test_lars_still_adapts_without_weight_decay():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    optimizer = create_timm_optimizer(model, "lars", learning_rate=1.0, weight_decay=0.0)
    weight = model.weight.detach().clone()
    model(torch.randn(8, 5)).square().sum().backward()
    grad = model.weight.grad.detach().clone()
    optimizer.step()
    torch.testing.assert_close(model.weight.detach(), weight - 1e-3 * weight.norm() / grad.norm() * grad)


def test_the_trainer_builds_timm_optimizers_and_refuses_unknown_names(tmp_path, digits):
    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, timm_optimizer="lars", learning_rate=0.3, weight_decay=1e-6),
        train_dataset=digits["train"].select(range(32)),
        data_collator=collator(),
    )
    trainer.create_optimizer()
    assert isinstance(trainer.optimizer, Lars)
    assert {group["weight_decay"] for group in trainer.optimizer.param_groups} == {1e-6, 0.0}
    with pytest.raises(ValueError, match="--timm_optimizer 'larss' is not a timm optimiser"):
        arguments(tmp_path, timm_optimizer="larss")


def test_warmup_then_cosine_is_per_iteration(tmp_path, digits):
    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, timm_optimizer="adam", learning_rate=1e-3, warmup_steps=0.25, max_steps=8),
        train_dataset=digits["train"].select(range(64)),
        data_collator=collator(),
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    rates = []
    for _ in range(8):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    expected = [0.0, 5e-4] + [1e-3 * 0.5 * (1 + np.cos(np.pi * k / 6)) for k in range(6)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- monitoring


def test_knn_monitor_logs_the_1nn_accuracy_every_n_steps(tmp_path, digits):
    records = RecordLogs()
    evaluator = ProbeEvaluator(
        train_dataset=digits["train"].select(range(60)),
        test_dataset=digits["test"].select(range(40)),
        pixel_values_fn=collator().eval_pixel_values,
        shots_per_class=2,
    )
    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, knn_monitor_steps=2, max_steps=4, logging_steps=3),
        train_dataset=digits["train"].select(range(64)),
        data_collator=collator(),
        monitor_evaluator=evaluator,
        probe_evaluator=evaluator,
        callbacks=[records],
    )
    trainer.train()
    assert sum(KNNMonitorCallback.metric_name in log for log in records.logs) == 2  # reached the loggers
    history = [log for log in trainer.state.log_history if KNNMonitorCallback.metric_name in log]
    assert [log["step"] for log in history] == [2, 4]
    expected = knn_accuracy(
        *_features_and_labels(trainer.model, digits["train"].select(range(60))),
        *_features_and_labels(trainer.model, digits["test"].select(range(40))),
    )
    assert history[-1][KNNMonitorCallback.metric_name] == pytest.approx(expected, abs=1e-4)


def _features_and_labels(model, dataset):
    with torch.no_grad():
        model.eval()
        features = model(pixel_values=collator().eval_pixel_values(dataset["image"])).features
    return features, np.asarray(dataset["label"])


def test_knn_monitor_needs_labelled_data(tmp_path, digits):
    with pytest.raises(ValueError, match="--knn_monitor_steps needs labelled data"):
        ContrastiveTrainer(
            model=tiny_encoder(),
            args=arguments(tmp_path, knn_monitor_steps=2),
            train_dataset=digits["train"].select(range(32)),
            data_collator=collator(),
        )


# ---------------------------------------------------------------- accelerate


@pytest.mark.parametrize(
    ("name", "distributed_type", "num_processes", "precision"),
    [
        ("single_gpu", "NO", 1, "bf16"),
        ("multi_gpu", "MULTI_GPU", 8, "bf16"),
        ("multi_node", "MULTI_GPU", 16, "bf16"),
        ("cpu_2_processes", "MULTI_GPU", 2, "no"),
    ],
)
def test_the_accelerate_configs_load_with_accelerate(name, distributed_type, num_processes, precision):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / f"{name}.yaml"))
    assert str(config.distributed_type).endswith(distributed_type) and config.num_processes == num_processes
    assert str(config.mixed_precision).endswith(precision) and not config.use_cpu


def test_every_shipped_accelerate_config_is_tested():
    shipped = {path.stem for path in (ROOT / "recipes" / "accelerate").glob("*.yaml")}
    assert shipped == {"single_gpu", "multi_gpu", "multi_node", "cpu_2_processes"}


def test_backbone_kwargs_are_json_and_reach_the_encoder(tmp_path):
    from emc2_hf.pretraining import ModelArguments

    assert ModelArguments(backbone_kwargs='{"norm_layer": "groupnorm"}').backbone_kwargs == {"norm_layer": "groupnorm"}
    with pytest.raises(ValueError, match="--backbone_kwargs must be a JSON object"):
        ModelArguments(backbone_kwargs="norm_layer=groupnorm")
    with pytest.raises(ValueError, match="--backbone_kwargs must be a JSON object"):
        ModelArguments(backbone_kwargs="[1, 2]")
    _, model_args, _ = parse_recipe_arguments(
        ["--backbone_kwargs", '{"norm_layer": "groupnorm1"}', "--projection_batch_norm", "false"]
    )
    assert model_args.backbone_kwargs == {"norm_layer": "groupnorm1"} and model_args.projection_batch_norm is False


def test_a_presets_options_of_other_objectives_are_left_out_but_the_command_lines_stay_errors():
    """``stl10.py --config stl10_b32 --objective simclr`` (the README's baseline of the row) runs: the preset's EMC²
    burn-in does not apply to SimCLR and is left out; the same flag typed on the command line is still refused."""
    from emc2_hf.pretraining import parse_recipe_arguments
    from emc2_hf.pretraining.checks import RecipeArgumentError, check_objective_settings

    presets = os.path.join(ROOT, "recipes", "presets")
    _, _, emc2 = parse_recipe_arguments(["--config", "stl10_b32", "--output_dir", "x"], presets_dir=presets)
    assert emc2.objective == "emc2" and emc2.burn_in == 31
    _, _, simclr = parse_recipe_arguments(
        ["--config", "stl10_b32", "--objective", "simclr", "--output_dir", "x"], presets_dir=presets
    )
    assert simclr.burn_in is None
    check_objective_settings(simclr)  # no error
    _, _, typed = parse_recipe_arguments(
        ["--config", "stl10_b32", "--objective", "simclr", "--burn_in", "31", "--output_dir", "x"],
        presets_dir=presets,
    )
    with pytest.raises(RecipeArgumentError, match="--burn_in applies to the objective"):
        check_objective_settings(typed)
