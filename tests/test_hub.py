"""Exports load in timm and transformers with the trained features; cards carry real metrics; pushes upload exports."""

import importlib.util
import json
import os
import sys

import pytest
import timm
import torch
import yaml
from huggingface_hub import HfApi
from transformers import AutoModel

from emc2_hf import (
    ContrastiveCollator,
    ContrastiveEncoder,
    ContrastiveEncoderConfig,
    ContrastiveTrainer,
    ContrastiveTrainingArguments,
    ModelCardData,
    ProbeEvaluator,
    SimCLRAugmentation,
    export_encoder,
    load_projection_head,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5  # float32 features of the same weights through three wrappers; observed 0.0


@pytest.mark.parametrize("backbone", ["test_resnet", "resnet18", "vit_tiny_patch16_224"])
def test_export_loads_in_timm_and_transformers_with_identical_features(tmp_path, backbone):
    torch.manual_seed(0)
    image_size = 224 if backbone.startswith("vit") else 32
    kwargs = {"img_size": image_size} if backbone.startswith("vit") else None
    model = ContrastiveEncoder(ContrastiveEncoderConfig(backbone=backbone, backbone_kwargs=kwargs)).eval()
    # Non-trivial BatchNorm statistics, as after training.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    export_encoder(model, tmp_path, image_size=image_size)
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        expected = model(pixel_values=pixels).features
        from_timm = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()(pixels)
        wrapper = AutoModel.from_pretrained(str(tmp_path)).eval()
        from_transformers = wrapper(pixel_values=pixels).pooler_output
    assert type(wrapper).__name__ == "TimmWrapperModel"
    assert (from_timm - expected).abs().max().item() <= TOLERANCE
    assert (from_transformers - expected).abs().max().item() <= TOLERANCE
    config = json.loads((tmp_path / "config.json").read_text())
    assert "num_classes" not in config["model_args"] and config["num_classes"] == 0


def test_projection_head_is_optional_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = ContrastiveEncoder(ContrastiveEncoderConfig(backbone="test_resnet", projection_dim=16)).eval()
    assert "projection_head.safetensors" not in export_encoder(model, tmp_path / "plain", image_size=32)
    export_encoder(model, tmp_path / "head", image_size=32, include_projection_head=True)
    head = load_projection_head(tmp_path / "head")
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        output = model(pixel_values=pixels)
        assert torch.allclose(head(output.features), output.embeddings, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="include_projection_head=True"):
        load_projection_head(tmp_path / "plain")


def test_a_batch_free_encoder_exports_with_its_groupnorm_and_head(tmp_path):
    torch.manual_seed(0)
    config = ContrastiveEncoderConfig(
        backbone="resnet18",
        backbone_kwargs={"norm_layer": "groupnorm"},
        projection_dim=16,
        projection_batch_norm=False,
    )
    model = ContrastiveEncoder(config).eval()
    assert not any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules())
    export_encoder(model, tmp_path, image_size=32, include_projection_head=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        output = model(pixel_values=pixels)
        from_timm = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()(pixels)
        from_transformers = AutoModel.from_pretrained(str(tmp_path)).eval()(pixel_values=pixels).pooler_output
        head = load_projection_head(tmp_path)
        assert (from_timm - output.features).abs().max().item() <= TOLERANCE
        assert (from_transformers - output.features).abs().max().item() <= TOLERANCE
        assert torch.allclose(head(output.features), output.embeddings, atol=1e-6)
    assert not any(isinstance(module, torch.nn.BatchNorm1d) for module in head.modules())


def short_run(tmp_path, digits, objective="emc2", **overrides):
    torch.manual_seed(0)
    collator = ContrastiveCollator(augmentation=SimCLRAugmentation(image_size=16))
    evaluator = ProbeEvaluator(
        digits["train"].select(range(100)),
        digits["test"].select(range(60)),
        collator.eval_pixel_values,
        num_draws=2,
        shots_per_class=2,
    )
    args = ContrastiveTrainingArguments(
        output_dir=str(tmp_path),
        objective=objective,
        per_device_train_batch_size=8,
        max_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        inverse_temperature=7.5,
        **overrides,
    )
    return ContrastiveTrainer(
        model=ContrastiveEncoder(ContrastiveEncoderConfig(backbone="test_resnet", projection_dim=16)),
        args=args,
        train_dataset=digits["train"].select(range(40)),
        data_collator=collator,
        probe_evaluator=evaluator,
        model_card_data=ModelCardData(
            dataset_name="scikit-learn digits", train_split="train", probe_train_split="train", eval_split="test"
        ),
    )


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("objective", ["emc2", "sogclr"])
def test_model_card_renders_the_runs_real_settings_and_metrics(tmp_path, digits, objective):
    trainer = short_run(tmp_path, digits, objective)
    trainer.train()  # the ProbeCallback evaluates at the last step
    step, _, metrics = trainer.last_evaluation
    export_dir = trainer.export(str(tmp_path / "export"))
    card = (tmp_path / "export" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "timm" and "datasets" not in meta  # only Hub ids belong there
    assert objective in meta["tags"] and "accuracy" in meta["metrics"]
    reported = {m["name"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert reported["Linear-probe accuracy"] == pytest.approx(metrics["eval_linear_probe_accuracy"], abs=1e-4)
    assert reported["1-NN accuracy"] == pytest.approx(metrics["eval_knn_accuracy"], abs=1e-4)
    assert all(r["dataset"]["split"] == "test" for r in meta["model-index"][0]["results"])
    assert "| inverse temperature β | 7.5 |" in card
    assert "2 steps" in card and f"at step {step}" in card and "| global batch size | 8 images" in card
    assert f'timm.create_model("local-dir:{tmp_path / "export"}"' in card and "AutoModel.from_pretrained" in card
    assert "yau2024emc2" in card
    if objective == "emc2":
        assert "| Metropolis–Hastings proposals R | 14 (default 2b − 2 at b = 8) |" in card
        assert "| burn-in P | 7 (default R // 2) |" in card and "yuan2022sogclr" not in card
    else:
        assert "| moving-average γ | 0.9 |" in card and "yuan2022sogclr" in card
    import emc2_hf

    assert emc2_hf.__version__ in card
    timm.create_model(f"local-dir:{export_dir}", pretrained=True)


@pytest.fixture
def hub_calls(monkeypatch):
    calls = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        calls["create_repo"].append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls["upload_folder"].append(
            {
                "repo_id": repo_id,
                "files": sorted(os.listdir(folder_path)),
                "config": json.loads(open(os.path.join(folder_path, "config.json")).read()),
                "card": open(os.path.join(folder_path, "README.md")).read(),
            }
        )
        return "committed"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_export_and_never_a_checkpoint(tmp_path, digits, hub_calls):
    trainer = short_run(
        tmp_path, digits, push_to_hub=True, hub_model_id="someone/digits-emc2", save_strategy="steps", save_steps=1
    )
    trainer.train()
    assert hub_calls["upload_folder"] == []  # checkpoints at steps 1 and 2 stayed local
    assert trainer.push_to_hub() == "committed"
    (upload,) = hub_calls["upload_folder"]
    assert upload["repo_id"] == "someone/digits-emc2"
    assert upload["files"] == ["README.md", "config.json", "model.safetensors"]
    assert upload["config"]["architecture"] == "test_resnet"
    assert "someone/digits-emc2" in upload["card"]


def test_recipe_push_flag_uploads_the_export(tmp_path, hub_calls, monkeypatch):
    spec = importlib.util.spec_from_file_location("stl10_recipe", os.path.join(ROOT, "recipes", "stl10.py"))
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "stl10_recipe", recipe)
    spec.loader.exec_module(recipe)
    recipe.main(
        [
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
            "2",
            "--use_cpu",
            "true",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(tmp_path),
            "--push_to_hub",
            "true",
            "--hub_model_id",
            "someone/recipe-push",
            "--export_projection_head",
            "true",
            "--save_strategy",
            "no",
        ]
    )
    (upload,) = hub_calls["upload_folder"]
    assert upload["files"] == ["README.md", "config.json", "model.safetensors", "projection_head.safetensors"]
    assert "scikit-learn digits" in upload["card"]
    assert (tmp_path / "export" / "README.md").exists()
