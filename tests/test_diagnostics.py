"""Exact diagnostics against their definitions: L(θ) of eq. (1) and ∇L(θ) of eq. (4) on a finite set of fixed views."""

import logging

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from emc2_hf import ContrastiveEncoder, ContrastiveEncoderConfig
from emc2_hf.evaluation.diagnostics import (
    GlobalLossCallback,
    fixed_views,
    global_loss_and_gradient,
)
from emc2_hf.objectives import global_contrastive_loss

BETA = 2.0
# global_contrastive_loss computes in float32 (``features.float()``) even for a float64 model, so two exact ways of
# computing L and ∇L agree to float32's precision: about 1e-7 relative to each tensor's scale.
PRECISION = 1e-6


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = PRECISION) -> None:
    """Equal up to ``rel`` times the largest entry of ``expected`` (entries near zero are judged at that scale)."""
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= rel * expected.abs().max()


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8)).to(dtype)


def random_views(num_images: int = 12, num_views: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(num_images, num_views, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)


def global_loss_by_definition(features: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. (1) term by term, in the features' dtype: mean over (i, a ≠ a') of −β s(x_i^a, x_i^a') + log Σ_{j≠i, c}."""
    num_images, num_views, _ = features.shape
    unit = features / features.norm(dim=-1, keepdim=True)
    terms = []
    for i in range(num_images):
        for a in range(num_views):
            negatives = torch.cat([beta * unit[j] @ unit[i, a] for j in range(num_images) if j != i])
            for other in range(num_views):
                if other != a:
                    terms.append(-beta * unit[i, a] @ unit[i, other] + torch.logsumexp(negatives, dim=0))
    return torch.stack(terms).mean()


def full_graph_loss(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """The direct computation: every view through the model in one batch, with autograd."""
    num_images, num_views = views.shape[:2]
    return global_contrastive_loss(model(views.flatten(0, 1)).reshape(num_images, num_views, -1), BETA)


@pytest.mark.parametrize("num_views", [2, 3])
def test_loss_is_eq_1_and_gradient_is_that_of_the_full_graph(num_views):
    model, views = tiny_mlp(), random_views(num_views=num_views)
    result = global_loss_and_gradient(model, views, BETA, embed=model, chunk_size=5, return_gradient=True)
    expected_loss = full_graph_loss(model, views)
    expected_gradient = torch.autograd.grad(expected_loss, list(model.parameters()))
    assert result.loss == pytest.approx(expected_loss.item(), rel=PRECISION)
    with torch.no_grad():
        by_definition = global_loss_by_definition(model(views.flatten(0, 1)).reshape(*views.shape[:2], -1), BETA)
    assert result.loss == pytest.approx(by_definition.item(), rel=PRECISION)
    for gradient, expected in zip(result.gradient, expected_gradient, strict=True):
        assert_close(gradient, expected)
    norm_squared = sum(g.pow(2).sum() for g in result.gradient).item()
    assert result.gradient_norm_squared == pytest.approx(norm_squared, rel=1e-12)


def test_gradient_matches_central_finite_differences_of_the_loss():
    model, views = tiny_mlp(), random_views()
    parameters = list(model.parameters())
    gradient = global_loss_and_gradient(model, views, BETA, embed=model, return_gradient=True).gradient
    flat_gradient = torch.cat([g.flatten() for g in gradient])
    generator = torch.Generator().manual_seed(2)
    directions = [torch.randn(flat_gradient.numel(), generator=generator, dtype=torch.float64) for _ in range(3)]
    for coordinate in torch.randperm(flat_gradient.numel(), generator=generator)[:3].tolist():
        directions.append(torch.zeros_like(flat_gradient).index_fill_(0, torch.tensor([coordinate]), 1.0))

    def loss_at(offset: torch.Tensor) -> float:
        with torch.no_grad():
            saved = [p.clone() for p in parameters]
            torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(parameters) + offset, parameters)
            value = global_loss_by_definition(model(views.flatten(0, 1)).reshape(*views.shape[:2], -1), BETA)
            for p, s in zip(parameters, saved, strict=True):
                p.copy_(s)
        return value.item()

    step = 1e-5
    for direction in directions:
        finite_difference = (loss_at(step * direction) - loss_at(-step * direction)) / (2 * step)
        analytic = (flat_gradient @ direction).item()
        # Relative to the scale of the directional derivative (a single coordinate's can be near zero).
        scale = flat_gradient.norm().item() * direction.norm().item()
        assert abs(analytic - finite_difference) < 1e-5 * max(abs(finite_difference), scale)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 23, 24, 1000])
def test_chunked_evaluation_equals_the_unchunked_one(chunk_size):
    model, views = tiny_mlp(), random_views()
    whole = global_loss_and_gradient(model, views, BETA, embed=model, chunk_size=10_000, return_gradient=True)
    chunked = global_loss_and_gradient(model, views, BETA, embed=model, chunk_size=chunk_size, return_gradient=True)
    assert chunked.loss == pytest.approx(whole.loss, rel=PRECISION)
    assert chunked.gradient_norm_squared == pytest.approx(whole.gradient_norm_squared, rel=2 * PRECISION)
    for part, total in zip(chunked.gradient, whole.gradient, strict=True):
        assert_close(part, total)


def test_given_parameters_get_their_part_of_the_full_gradient():
    model, views = tiny_mlp(), random_views()
    full = global_loss_and_gradient(model, views, BETA, embed=model, return_gradient=True)
    last_weight = model[2].weight
    part = global_loss_and_gradient(model, views, BETA, embed=model, parameters=[last_weight], return_gradient=True)
    assert len(part.gradient) == 1
    assert_close(part.gradient[0], full.gradient[2])
    assert part.gradient_norm_squared == pytest.approx(full.gradient[2].pow(2).sum().item(), rel=2 * PRECISION)


def test_contrastive_encoder_runs_in_eval_mode_and_training_state_is_untouched():
    model = ContrastiveEncoder(ContrastiveEncoderConfig(backbone="test_resnet", projection_dim=8))
    model.train()
    model.backbone.conv1.eval()  # a mixed-mode model: every module's own mode must come back
    modes = {name: module.training for name, module in model.named_modules()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    views = torch.randn(4, 2, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():  # works from inside an evaluation too
        result = global_loss_and_gradient(model, views, BETA, chunk_size=3)

    assert {name: module.training for name, module in model.named_modules()} == modes
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())  # BatchNorm statistics too
    model.eval()
    expected = global_contrastive_loss(model(pixel_values=views.flatten(0, 1)).embeddings.reshape(4, 2, -1), BETA)
    assert result.loss == pytest.approx(expected.item(), rel=1e-5)
    assert result.gradient_norm_squared > 0


class AlwaysDropout(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, 0.5, training=True)


def test_a_model_that_is_random_in_eval_mode_is_refused():
    model = nn.Sequential(nn.Linear(5, 8), AlwaysDropout())
    with pytest.raises(RuntimeError, match="deterministic"):
        global_loss_and_gradient(model, random_views(dtype=torch.float32), BETA, embed=model)


def test_a_dataset_too_large_is_refused_with_the_reason():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"too large for exact diagnostics.*24 views > max_views=20.*O\(\(m·A\)²\)"):
        global_loss_and_gradient(model, random_views(), BETA, embed=model, max_views=20)


def fake_state(step: int, max_steps: int = 10) -> TrainerState:
    state = TrainerState(global_step=step, max_steps=max_steps)
    state.is_world_process_zero = True
    return state


def test_callback_warns_once_and_stays_off_when_the_dataset_is_too_large(tmp_path, caplog):
    model = tiny_mlp()
    callback = GlobalLossCallback(random_views(), 1, BETA, embed=lambda m, x: m(x), max_views=20)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with caplog.at_level(logging.WARNING, logger="emc2_hf.evaluation.diagnostics"):
        callback.on_train_begin(args, fake_state(0), TrainerControl(), model=model)
        for step in (1, 2, 3):
            control = callback.on_step_end(args, fake_state(step), TrainerControl(), model=model)
            assert not control.should_log
        callback.on_train_end(args, fake_state(3), TrainerControl(), model=model)
    warnings = [record for record in caplog.records if "too large for exact diagnostics" in record.getMessage()]
    assert len(warnings) == 1 and "24 views > max_views=20" in warnings[0].getMessage()
    assert callback.disabled and callback.history == [] and callback.pop_pending() == {}


class LossModel(nn.Module):
    """Trains the MLP on the loss (1) of each mini-batch of fixed views ``[b, 2, 5]``."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = tiny_mlp(dtype=torch.float32)

    def forward(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        embeddings = self.mlp(views.flatten(0, 1)).reshape(views.shape[0], views.shape[1], -1)
        return {"loss": global_contrastive_loss(embeddings, BETA)}


class MonitoredTrainer(Trainer):
    """The wiring ContrastiveTrainer.log does for the kNN monitor."""

    def __init__(self, *args, monitor: GlobalLossCallback, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.monitor = monitor

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.monitor.pop_pending())
        super().log(logs, start_time)


class ParameterSnapshots(TrainerCallback):
    def __init__(self) -> None:
        self.at_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_step[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}

    on_step_end = on_train_begin


def test_callback_in_a_trainer_logs_the_exact_values_at_the_expected_steps(tmp_path):
    views = random_views(dtype=torch.float32)
    rows = [{"views": v} for v in views]
    model = LossModel()
    monitor = GlobalLossCallback(views, every_n_steps=2, inverse_temperature=BETA, embed=lambda m, x: m.mlp(x))
    snapshots = ParameterSnapshots()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=0.5,
        optim="sgd",
        logging_steps=1000,  # the monitor's steps are logged all the same
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = MonitoredTrainer(
        model=model, args=args, train_dataset=rows, callbacks=[monitor, snapshots], monitor=monitor
    )
    trainer.train()

    assert [entry["step"] for entry in monitor.history] == [0, 2, 4, 5]
    for entry in monitor.history:
        model.load_state_dict(snapshots.at_step[entry["step"]])
        direct = global_loss_and_gradient(model.mlp, views, BETA, embed=model.mlp)
        assert entry["global_loss"] == pytest.approx(direct.loss, rel=1e-6)
        assert entry["global_gradient_norm_squared"] == pytest.approx(direct.gradient_norm_squared, rel=1e-5)
    logged = {e["step"]: e for e in trainer.state.log_history if "global_loss" in e}
    assert sorted(logged) == [0, 2, 4, 5]
    assert all(logged[e["step"]]["global_loss"] == e["global_loss"] for e in monitor.history)
    assert monitor.history[-1]["global_loss"] < monitor.history[0]["global_loss"]  # SGD on the loss lowers it


def test_fixed_views_stacks_each_view_of_each_image():
    images = [torch.full((3,), float(i)) for i in range(4)]
    views = fixed_views(images, lambda image, view: image + 10 * view, num_views=3)
    assert views.shape == (4, 3, 3)
    assert torch.equal(views[2, 1], torch.full((3,), 12.0))
