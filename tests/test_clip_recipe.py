"""recipes/clip_finetune.py as a user runs it: flags, refusals, and (slow) the offline default end to end."""

import json
import os
import subprocess
import sys

import pytest

from emc2_hf.finetuning import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_the_dual_encoder_flags():
    result = subprocess.run(
        [sys.executable, "recipes/clip_finetune.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for flag in (
        "--caption_choice",
        "--text_tower",
        "--image_tower",
        "--model_name_or_path",
        "--learn_logit_scale",
        "--freeze_image_tower",
        "--freeze_text_tower",
        "--objective",
    ):
        assert flag in result.stdout, flag


def test_a_model_that_is_not_a_dual_encoder_is_refused_in_one_line(tmp_path, capsys):
    from emc2_hf import ContrastiveEncoder, ContrastiveEncoderConfig

    ContrastiveEncoder(ContrastiveEncoderConfig(backbone="test_resnet")).save_pretrained(tmp_path / "encoder")
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", str(tmp_path / "encoder"), "--output_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "not a dual encoder" in message


def test_bad_values_exit_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(tmp_path), "--per_device_train_batch_size", "1"])
    assert exit_info.value.code == 2
    assert "at least 2" in capsys.readouterr().err


@pytest.mark.slow
def test_the_offline_default_fine_tunes_measures_before_and_after_and_exports(tmp_path):
    output_dir = tmp_path / "clip"
    results = main(
        [
            "--output_dir", str(output_dir), "--max_steps", "6", "--per_device_train_batch_size", "8",
            "--max_eval_rows", "60", "--logging_steps", "2",
        ]
    )  # fmt: skip
    for key in ("zero_shot_top1", "image_to_text_recall@1", "text_to_image_recall@10"):
        assert 0.0 <= results[f"eval_{key}"] <= 1.0 and f"untrained_{key}" in results
    saved = json.loads((output_dir / "eval_results.json").read_text())
    assert saved["eval_zero_shot_top1"] == results["eval_zero_shot_top1"]
    assert (output_dir / "training_curves.png").is_file()
    card = (output_dir / "export" / "README.md").read_text()
    assert "before training" in card and "digits" in card
    assert "sentence-transformers/all-MiniLM-L6-v2" in card and "site-packages" not in card  # no local paths
    assert "class-level retrieval" in card
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(output_dir / "export")
    assert type(model).__name__ == "VisionTextDualEncoderModel"
    assert AutoTokenizer.from_pretrained(output_dir / "export")("a handwritten 3")["input_ids"]


def test_a_shipped_preset_sets_the_flags_and_later_flags_win(tmp_path):
    from emc2_hf.finetuning import parse_arguments

    data_args, model_args, training_args = parse_arguments(
        ["--config", "flickr30k_clip_b64", "--output_dir", str(tmp_path), "--bf16", "false", "--seed", "3"]
    )
    assert data_args.dataset_name == "nlphuji/flickr30k" and data_args.image_size == 224
    assert model_args.model_name_or_path == "openai/clip-vit-base-patch32"
    assert training_args.per_device_train_batch_size == 64 and training_args.objective == "emc2"
    assert training_args.output_dir == str(tmp_path) and training_args.seed == 3
    with pytest.raises(FileNotFoundError, match="shipped presets are"):
        parse_arguments(["--config", "no_such_preset"])
