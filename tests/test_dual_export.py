"""Dual encoders export as one model: both towers load back with AutoModel and give the same features."""

import pytest
import torch
import yaml
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPConfig,
    CLIPModel,
    VisionTextDualEncoderModel,
)

from emc2_hf import ContrastiveEncoder, ContrastiveEncoderConfig, EMC2Objective
from emc2_hf.hub import DualEncoderCardData, dual_encoder_features, export_dual_encoder
from emc2_hf.modeling import build_dual_encoder, timm_image_tower

VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "digit", "zero", "one"]


def tiny_text_tower() -> BertModel:
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=len(VOCABULARY), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    return BertModel(config)


def tokenizer(tmp_path) -> BertTokenizerFast:
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("\n".join(VOCABULARY) + "\n")
    return BertTokenizerFast(vocab=str(vocabulary))  # transformers 5 ignores vocab_file=


@pytest.fixture
def timm_bert_dual_encoder():
    torch.manual_seed(0)
    encoder = ContrastiveEncoder(ContrastiveEncoderConfig(backbone="test_resnet", projection_dim=16)).eval()
    model = build_dual_encoder(timm_image_tower(encoder, image_size=32), tiny_text_tower(), projection_dim=24)
    return encoder, model


def card_data() -> DualEncoderCardData:
    objective = EMC2Objective(num_samples=10, inverse_temperature=14.28)
    return DualEncoderCardData(
        dataset_name="someone/captions",
        train_split="train",
        eval_split="test",
        objective="emc2",
        objective_config=objective.get_config_dict(),
        batch_size=64,
        steps=1000,
        learning_rate=1e-4,
        weight_decay=0.1,
        metrics={"image_to_text_recall@1": 0.4125, "text_to_image_recall@1": 0.3875, "zero_shot_accuracy": 0.61},
        image_size=32,
    )


def test_a_timm_and_bert_dual_encoder_loads_back_as_one_model(tmp_path, timm_bert_dual_encoder):
    encoder, model = timm_bert_dual_encoder
    text_tokenizer = tokenizer(tmp_path)
    files = export_dual_encoder(model, tmp_path / "export", card=card_data(), tokenizer=text_tokenizer)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    assert not any(name.endswith((".bin", ".pt")) for name in files)

    loaded = AutoModel.from_pretrained(tmp_path / "export")
    assert isinstance(loaded, VisionTextDualEncoderModel)
    pixel_values = torch.randn(3, 3, 32, 32)
    batch = AutoTokenizer.from_pretrained(tmp_path / "export")(
        ["a photo of a cat", "a dog", "digit one"], padding=True, return_tensors="pt"
    )
    expected = dual_encoder_features(model, pixel_values, batch["input_ids"], batch["attention_mask"])
    actual = dual_encoder_features(loaded, pixel_values, batch["input_ids"], batch["attention_mask"])
    for want, got in zip(expected, actual, strict=True):
        assert got.shape[-1] == 24
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # The image tower is the pre-trained timm backbone: its pooled features are the encoder's features.
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval().vision_model(pixel_values=pixel_values).pooler_output,
            encoder(pixel_values=pixel_values).features,
            rtol=0,
            atol=1e-6,
        )
        logits = loaded(input_ids=batch["input_ids"], pixel_values=pixel_values).logits_per_image
    assert logits.shape == (3, 3)


def test_a_clip_model_exports_and_loads_back(tmp_path):
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": 50,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    model = CLIPModel(config)
    export_dual_encoder(model, tmp_path / "clip")
    loaded = AutoModel.from_pretrained(tmp_path / "clip")
    assert isinstance(loaded, CLIPModel)
    pixel_values, input_ids = torch.randn(2, 3, 32, 32), torch.randint(0, 50, (2, 6))
    for want, got in zip(
        dual_encoder_features(model, pixel_values, input_ids, None),
        dual_encoder_features(loaded, pixel_values, input_ids, None),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_the_dual_encoder_card_states_the_run_and_its_metrics(tmp_path, timm_bert_dual_encoder):
    _, model = timm_bert_dual_encoder
    export_dual_encoder(model, tmp_path / "export", card=card_data(), repo_id="user/tiny-dual")
    card = (tmp_path / "export" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers" and header["datasets"] == ["someone/captions"]
    assert "emc2" in header["tags"] and header["pipeline_tag"] == "zero-shot-image-classification"
    results = header["model-index"][0]["results"]
    assert {result["metrics"][0]["value"] for result in results} == {0.4125, 0.3875, 0.61}
    assert all(result["dataset"]["split"] == "test" for result in results)
    assert "inverse temperature β | 14.28" in card and "burn-in P" in card
    assert "test_resnet" in card and 'AutoModel.from_pretrained("user/tiny-dual")' in card
    assert "@inproceedings{yau2024emc2" in card and "| Image→text recall@1 | 0.4125 |" in card


def test_bad_dual_exports_are_refused(tmp_path, timm_bert_dual_encoder):
    _, model = timm_bert_dual_encoder
    with pytest.raises(ValueError, match=r"unknown dual-encoder metric\(s\) \['recall'\]"):
        export_dual_encoder(model, tmp_path / "a", card=DualEncoderCardData(metrics={"recall": 0.5}))
    with pytest.raises(TypeError, match="needs a model with both towers"):
        export_dual_encoder(tiny_text_tower(), tmp_path / "b")
    with pytest.raises(ValueError, match="has no hidden_size; for a timm backbone use timm_image_tower"):
        tower = timm_image_tower(
            ContrastiveEncoder(ContrastiveEncoderConfig(backbone="test_resnet", projection_dim=8)), 32
        )
        del tower.config.hidden_size
        build_dual_encoder(tower, tiny_text_tower())


def test_push_uploads_the_dual_export_and_nothing_else(tmp_path, timm_bert_dual_encoder, monkeypatch):
    import json
    import os

    from huggingface_hub import HfApi

    from emc2_hf.hub import push_dual_encoder

    uploads = []

    def create_repo(self, repo_id, **kwargs):
        uploads.append(("create_repo", repo_id))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = sorted(os.listdir(folder_path))
        config = json.loads(open(os.path.join(folder_path, "config.json")).read())
        uploads.append(
            ("upload_folder", repo_id, files, config["model_type"], open(folder_path + "/README.md").read())
        )
        return "committed"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    _, model = timm_bert_dual_encoder
    assert (
        push_dual_encoder(model, "someone/tiny-dual", card=card_data(), tokenizer=tokenizer(tmp_path)) == "committed"
    )
    (created, (_, repo_id, files, model_type, card)) = uploads
    assert created == ("create_repo", "someone/tiny-dual") and repo_id == "someone/tiny-dual"
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    assert not any("checkpoint" in name or name.endswith((".bin", ".pt")) for name in files)
    assert model_type == "vision-text-dual-encoder" and "someone/tiny-dual" in card
