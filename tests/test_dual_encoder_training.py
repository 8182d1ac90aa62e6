"""ContrastiveTrainer on image–text pairs: every objective trains a dual encoder, the learned scale, frozen towers,
per-direction chains with re-encoded states, resume, evaluation and export."""

import math
import os

import pytest
import torch
from dual_fixtures import digits_tokenizer, tiny_dual_encoder
from safetensors.torch import load_file
from test_distributed import torchrun
from transformers import AutoModel, AutoTokenizer

from emc2_hf import (
    ContrastiveTrainer,
    ContrastiveTrainingArguments,
    ImageTextCollator,
    ImageTextTransforms,
    RetrievalEvaluator,
    ZeroShotEvaluator,
    combine_evaluators,
)
from emc2_hf.data.image_text import DIGIT_CLASS_NAMES, load_digits_captions
from emc2_hf.tasks import MAX_LOGIT_SCALE

TRANSFORMS = ImageTextTransforms(image_size=16)


@pytest.fixture(scope="module")
def digits_pairs():
    splits = load_digits_captions(image_size=16)
    return splits["train"].select(range(24)), splits["test"].select(range(30))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return digits_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def _trainer(tmp_path, pairs, tokenizer, objective="emc2", evaluator=None, model=None, **overrides):
    arguments = dict(
        output_dir=str(tmp_path / "run"),
        objective=objective,
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=0.01,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        use_cpu=True,
        seed=0,
    )
    arguments.update(overrides)
    return ContrastiveTrainer(
        model=model if model is not None else tiny_dual_encoder(),
        args=ContrastiveTrainingArguments(**arguments),
        train_dataset=pairs,
        data_collator=ImageTextCollator(tokenizer, TRANSFORMS, max_length=16),
        probe_evaluator=evaluator,
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("objective", ["simclr", "sogclr", "emc2", "emc2_in_batch", "dcl"])
def test_every_objective_trains_a_dual_encoder_in_both_directions(tmp_path, digits_pairs, tokenizer, objective):
    trainer = _trainer(tmp_path, digits_pairs[0], tokenizer, objective)
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    changed = [name for name, value in trainer.model.state_dict().items() if not torch.equal(value, before[name])]
    assert any(name.startswith("vision_model") for name in changed)
    assert any(name.startswith("text_model") for name in changed)
    assert "logit_scale" in changed  # learned by default
    assert {"temperature"} <= set(trainer.state.log_history[0])
    assert trainer.objective.name == objective and "both directions" in trainer.objective.title


def test_emc2_keeps_one_chain_per_image_and_per_caption_and_re_encodes_their_states(tmp_path, digits_pairs, tokenizer):
    """12 steps of 4 pairs = 2 epochs of 24 pairs: in epoch 2 chains start on states outside the batch, which the
    collator delivers and the model encodes (``reencoded_fraction`` > 0)."""
    trainer = _trainer(tmp_path, digits_pairs[0], tokenizer, "emc2", max_steps=12)
    image_chains = trainer.objective.image_to_text.chains
    text_chains = trainer.objective.text_to_image.chains
    assert image_chains.num_slots == 1 and text_chains.num_slots == 5  # digits rows carry 5 captions
    trainer.train()
    assert (image_chains.state_index[:, 0] != -1).all()  # every pair's image ran its chain
    assert (image_chains.state_view[:, 0] >= 0).all() and (image_chains.state_view[:, 0] < 5).all()  # captions
    assert (text_chains.state_index != -1).sum() >= 24  # each pair's caption of the epoch ran its chain
    reencoded = [
        entry[f"{direction}_reencoded_fraction"]
        for entry in trainer.state.log_history[6:]
        if "loss" in entry
        for direction in ("image_to_text", "text_to_image")
    ]
    assert max(reencoded) > 0
    for direction, table in trainer.chain_table.items():  # the workers' copy follows the objective
        chains = trainer.objective.directions[direction].chains
        assert torch.equal(table.state_index, chains.state_index) and torch.equal(table.state_view, chains.state_view)


def test_the_learned_scale_is_clamped_at_ln_100_and_a_fixed_scale_is_inverse_temperature(
    tmp_path, digits_pairs, tokenizer
):
    model = tiny_dual_encoder()
    with torch.no_grad():
        model.logit_scale.fill_(6.0)  # β = 403 > 100
    trainer = _trainer(tmp_path, digits_pairs[0], tokenizer, "simclr", model=model, learning_rate=1e-4)
    trainer.train()
    temperatures = [entry["temperature"] for entry in trainer.state.log_history if "temperature" in entry]
    assert temperatures[0] == pytest.approx(0.01, abs=1e-4)  # clamped before the first step: β = 100
    assert float(model.logit_scale.detach()) <= MAX_LOGIT_SCALE + 1e-3

    fixed_model = tiny_dual_encoder()
    initial = float(fixed_model.logit_scale.detach())
    fixed = _trainer(
        tmp_path / "fixed", digits_pairs[0], tokenizer, "simclr", model=fixed_model, learn_logit_scale=False
    )
    fixed.train()
    assert float(fixed_model.logit_scale.detach()) == initial and not fixed_model.logit_scale.requires_grad
    assert "temperature" not in fixed.state.log_history[0]


def test_frozen_image_tower_keeps_weights_and_statistics_while_its_projection_trains(
    tmp_path, digits_pairs, tokenizer
):
    model = tiny_dual_encoder()  # test_resnet with BatchNorm: statistics would move in train mode
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = _trainer(tmp_path, digits_pairs[0], tokenizer, "emc2", model=model, freeze_image_tower=True)
    trainer.train()
    after = model.state_dict()
    vision = [name for name in before if name.startswith("vision_model.")]
    assert vision and all(torch.equal(after[name], before[name]) for name in vision)
    assert not model.vision_model.training
    assert not torch.equal(after["visual_projection.weight"], before["visual_projection.weight"])
    assert any(not torch.equal(after[n], before[n]) for n in before if n.startswith("text_model."))


def test_evaluation_runs_before_and_after_and_the_export_loads_with_its_card(tmp_path, digits_pairs, tokenizer):
    train, test = digits_pairs
    evaluator = combine_evaluators(
        ZeroShotEvaluator(
            test, list(DIGIT_CLASS_NAMES), ["a photo of the digit {}."], tokenizer, TRANSFORMS.eval_transform
        ),
        RetrievalEvaluator(test, tokenizer, TRANSFORMS.eval_transform),
    )
    trainer = _trainer(tmp_path, train, tokenizer, "emc2", evaluator=evaluator)
    trainer.model_card_data.untrained_metrics = trainer.evaluate(metric_key_prefix="untrained")
    trainer.train()  # the ProbeCallback evaluates at the last step
    step, prefix, metrics = trainer.last_evaluation
    assert (step, prefix) == (3, "eval")
    assert {"eval_zero_shot_top1", "eval_image_to_text_recall@1", "eval_text_to_image_recall@10"} <= set(metrics)
    export = trainer.export()
    loaded = AutoModel.from_pretrained(export).eval()
    assert type(loaded).__name__ == "VisionTextDualEncoderModel"
    assert (
        AutoTokenizer.from_pretrained(export)("a photo of the digit three")["input_ids"]
        == tokenizer("a photo of the digit three")["input_ids"]
    )
    card = open(os.path.join(export, "README.md")).read()
    assert "before training" in card and "Zero-shot top-1 accuracy" in card
    assert f"{metrics['eval_zero_shot_top1']:.4f}" in card
    assert "learned exp(logit_scale)" in card
    model = trainer.model.eval()
    pixel_values = trainer.data_collator.eval_pixel_values([test[0]["image"], test[1]["image"]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.get_image_features(pixel_values=pixel_values).pooler_output,
            model.get_image_features(pixel_values=pixel_values).pooler_output,
        )


def test_resume_is_bit_exact_with_both_chain_tables(tmp_path, digits_pairs, tokenizer):
    common = dict(max_steps=8, save_strategy="steps", save_steps=4, optim="sgd", learning_rate=0.05)
    full = _trainer(tmp_path / "full", digits_pairs[0], tokenizer, "emc2", **common)
    full.train()
    resumed = _trainer(tmp_path / "resumed", digits_pairs[0], tokenizer, "emc2", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "run" / "checkpoint-4"))
    state = load_file(str(tmp_path / "full" / "run" / "checkpoint-4" / "per_sample_state.safetensors"))
    assert {"image_to_text.chains.state_index", "text_to_image.chains.state_index"} <= set(state)
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, value in full.objective.state_dict().items():
        assert torch.equal(value, resumed.objective.state_dict()[name]), name


def test_bad_combinations_are_refused_with_the_fix(tmp_path, digits_pairs, tokenizer):
    with pytest.raises(ValueError, match="global_loss_steps applies to two-view"):
        _trainer(tmp_path, digits_pairs[0], tokenizer, "emc2", global_loss_steps=2)
    with pytest.raises(ValueError, match="chain_fraction"):
        _trainer(tmp_path, digits_pairs[0], tokenizer, "emc2", emc2_chain_fraction=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["simclr", "sogclr", "dcl", "emc2", "emc2_in_batch"])
def test_two_processes_fine_tune_exactly_like_one_with_the_global_batch(tmp_path, objective):
    """2 processes × 4 pairs == 1 process × 8 pairs: the same chains and weights equal to float rounding (batch-free
    towers: GroupNorm image tower, BERT without dropout; plain SGD). Float state (similarities, log u) to rounding."""
    for processes in (1, 2):
        torchrun(objective, tmp_path, processes, script="tests/dual_worker.py")
    single, double = (load_file(str(tmp_path / f"dual-{objective}-{size}.safetensors")) for size in (1, 2))
    for name in single:
        if not single[name].is_floating_point():
            assert torch.equal(single[name], double[name]), name  # the same chain walks (indices, views), flags
        else:
            # Per-sample float state carries β = exp(logit_scale) ≈ 14 times the features' rounding (log u: 1.3e-5).
            tolerance = 1e-4 if name.startswith("chains.") else 1e-6
            torch.testing.assert_close(double[name], single[name], rtol=0, atol=tolerance, msg=name)


def tiny_clip_model():
    from dual_fixtures import digits_vocabulary
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(digits_vocabulary()),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    return CLIPModel(config)


@pytest.mark.parametrize("objective", ["simclr", "emc2"])
def test_an_existing_clip_model_is_fine_tuned_as_it_is_and_exported_as_one(
    tmp_path, digits_pairs, tokenizer, objective
):
    model = tiny_clip_model()
    trainer = _trainer(tmp_path, digits_pairs[0], tokenizer, objective, model=model, max_steps=8)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer.train()
    assert not torch.equal(model.state_dict()["text_projection.weight"], before["text_projection.weight"])
    export = trainer.export()
    loaded = AutoModel.from_pretrained(export)
    assert type(loaded).__name__ == "CLIPModel"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
