"""EMC²'s exact mode (re-encoded chain states) against its definitions: eq. (5), eq. (11), the metrics, the trainer.

Also the worker of the two-process test: ``torchrun --nproc_per_node 2 tests/test_exact_mode.py distributed DIR``.
"""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emc2_hf.objectives import EMC2Objective, SimCLRObjective, build_objective, pair_views
from emc2_hf.sampling import EMPTY_STATE, keyed_generator, proposals_with_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def global_softmax(features: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. (5) for every image (all views identical): row ``i`` is ``p(z | x_i) ∝ exp(β s(x_i, z))``, ``z ≠ i``."""
    logits = beta * features @ features.t()
    logits.fill_diagonal_(float("-inf"))
    return logits.softmax(dim=1)


def negative_distribution(
    features: torch.Tensor, beta: float, batch_images: int, steps: int, exact: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the chains on frozen features over ``steps`` uniformly drawn batches; return the empirical distribution of
    the negatives' weights per anchor image, after ``steps // 4`` steps and after ``steps``: ``[m, m]`` each."""
    num_images = features.shape[0]
    objective = EMC2Objective(num_images, beta, seed=seed, exact=exact)
    visits = torch.zeros(num_images, num_images)
    batches = torch.Generator().manual_seed(seed)
    snapshot = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up would dominate
    try:
        for step in range(steps):
            if step == steps // 4:
                snapshot = visits / visits.sum(dim=1, keepdim=True)
            batch = torch.randperm(num_images, generator=batches)[:batch_images]
            extra = {}
            if exact:  # the current model's features of the states outside the batch (frozen here)
                states = objective.states_to_encode(batch)
                extra = {"extra_embeddings": features[states], "extra_dataset_indices": states}
            pairs = pair_views(torch.cat([features[batch], features[batch]]), batch, **extra)
            weights, metrics = objective.negative_weights(pairs, keyed_generator(seed, "emc2", step))
            if exact:
                assert metrics["outside_batch_sample_fraction"].item() == 0.0
            anchors = pairs.anchor_dataset_indices[:, None].expand_as(weights)
            candidates = pairs.candidate_dataset_indices[None, :].expand_as(weights)
            visits.index_put_((anchors, candidates), weights, accumulate=True)
    finally:
        torch.set_num_threads(threads)
    return snapshot, visits / visits.sum(dim=1, keepdim=True)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row: ``½ Σ |p − q|``."""
    return 0.5 * (p - q).abs().sum(dim=1)


def test_exact_chains_sample_the_global_softmax_over_the_whole_dataset():
    # 16 images with frozen 3-d features, batches of 4 drawn uniformly, β = 4, seed 0. Every state the chains visit
    # can be re-encoded, so the exact mode's negatives should follow eq. (5) over all 15 other images: the mean TV
    # error over images falls like 1/√T (sampling noise, no bias floor): measured 0.068 after 2,000 steps and 0.027
    # after 8,000. The default mode replaces samples on out-of-batch states by the in-batch softmax and stays biased
    # (0.32 at 2,000 steps, 0.32 at 8,000).
    features = F.normalize(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    target = global_softmax(features, 4.0)
    early, late = negative_distribution(features, 4.0, batch_images=4, steps=8000, exact=True, seed=0)
    _, default = negative_distribution(features, 4.0, batch_images=4, steps=2000, exact=False, seed=0)
    assert torch.all(late.diagonal() == 0)
    exact_error, early_error = total_variation(late, target), total_variation(early, target)
    default_error = total_variation(default, target)
    assert exact_error.mean() < 0.04 and exact_error.max() < 0.07, exact_error
    assert exact_error.mean() < 0.65 * early_error.mean(), (early_error.mean(), exact_error.mean())  # ~1/√4
    assert default_error.mean() > 0.25 and default_error.mean() > 5 * exact_error.mean(), default_error.mean()


def cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u / u.norm()) @ (v / v.norm())


def test_exact_surrogate_gradient_is_eq_11_with_the_reencoded_columns():
    beta, num_images = 3.0, 4
    objective = EMC2Objective(10, beta, num_proposals=8, burn_in=2, seed=5, exact=True)
    batch = torch.arange(num_images)
    # Images 0 and 1 sit on states 7 and 8 (outside the batch), image 2 on image 1 (in the batch), image 3 is empty.
    objective.chains.state_index[:num_images] = torch.tensor([7, 8, 1, EMPTY_STATE])
    objective.chains.state_log_score[:num_images] = torch.tensor([50.0, 50.0, 50.0, -math.inf])  # stale scores
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2 * num_images, 5, generator=generator).requires_grad_(True)
    states = objective.states_to_encode(batch)
    assert states.tolist() == [7, 8]
    # Features of the two states close to their anchors', so the chains often stay on them.
    extra = (embeddings[:2].detach() + 0.3 * torch.randn(2, 5, generator=generator)).requires_grad_(True)

    before = copy.deepcopy(objective)
    output = objective(embeddings, batch, step=3, extra_embeddings=extra, extra_dataset_indices=states)
    weights, _ = before.negative_weights(
        pair_views(embeddings.detach(), batch, extra.detach(), states), keyed_generator(5, "emc2", 3, 0)
    )

    # The weights are visit frequencies over negatives; extra column 8 (state 7) only for image 0's views, 9 for 1's.
    assert torch.allclose(weights.sum(dim=1), torch.ones(8))
    same_image = torch.arange(8)[:, None] % num_images == torch.arange(8)[None, :] % num_images
    assert (weights[:, :8][same_image] == 0).all()
    own_start = torch.zeros(8, 2, dtype=torch.bool)
    own_start[[0, 4], 0] = True
    own_start[[1, 5], 1] = True
    assert (weights[:, 8:][~own_start] == 0).all()
    assert (weights[:, 8:][own_start] > 0).any()
    assert output.metrics["outside_batch_sample_fraction"].item() == 0.0

    # Eq. (11) by hand: mean_a −β [∇s(a, p(a)) − Σ_c w_ac ∇s(a, c)], c over views and re-encoded states alike.
    candidates = torch.cat([embeddings, extra])
    by_hand = 0.0
    for anchor in range(8):
        by_hand = by_hand - beta * cosine(embeddings[anchor], embeddings[(anchor + num_images) % 8]) / 8
        for column in range(10):
            if weights[anchor, column] > 0:
                term = weights[anchor, column] * cosine(embeddings[anchor], candidates[column])
                by_hand = by_hand + beta * term / 8
    gradient = torch.autograd.grad(output.loss, (embeddings, extra))
    expected = torch.autograd.grad(by_hand, (embeddings, extra))
    for got, want in zip(gradient, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    assert gradient[1].abs().sum() > 0  # the re-encoded negatives receive gradient


def test_reencoded_fraction_and_current_scores_on_a_hand_built_batch():
    beta = 4.0
    objective = EMC2Objective(10, beta, num_proposals=1, burn_in=0, seed=0, exact=True)
    batch = torch.tensor([0, 1, 2, 3, 4])
    # 0 → 5 and 3 → 5 (outside, shared), 1 → 2 (in the batch), 2 empty, 4 → 9 (outside): 3 of 5 images re-encode.
    objective.chains.state_index[:5] = torch.tensor([5, 2, EMPTY_STATE, 5, 9])
    objective.chains.state_log_score[:5] = torch.tensor([1e4, 1e4, -math.inf, 1e4, 1e4])  # stale and huge
    assert objective.states_to_encode(batch).tolist() == [5, 9]
    embeddings = F.normalize(torch.randn(10, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    extra = F.normalize(torch.randn(2, 3, generator=torch.Generator().manual_seed(2)), dim=1)
    with torch.no_grad():
        output = objective(embeddings, batch, extra_embeddings=extra, extra_dataset_indices=torch.tensor([5, 9]))
    assert output.metrics["reencoded_fraction"].item() == pytest.approx(0.6)
    assert output.metrics["outside_batch_sample_fraction"].item() == 0.0
    # Starts are scored with the current features (β·s ≤ β), not the stale 1e4: chains can move and scores stay ≤ β.
    assert output.metrics["acceptance_rate"].item() > 0
    assert objective.chains.state_log_score[:5].max().item() <= beta + 1e-5
    # The default mode keeps the stale score and never leaves.
    default = EMC2Objective(10, beta, num_proposals=1, burn_in=0, seed=0)
    default.chains.load_state_dict(before_state(batch))
    with torch.no_grad():
        stale = default(embeddings, batch)
    assert stale.metrics["outside_batch_sample_fraction"].item() == pytest.approx(0.6)
    assert "reencoded_fraction" not in stale.metrics


def before_state(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    state_index = torch.full((10,), EMPTY_STATE)
    state_index[batch] = torch.tensor([5, 2, EMPTY_STATE, 5, 9])
    state_log_score = torch.full((10,), -math.inf)
    state_log_score[batch] = torch.tensor([1e4, 1e4, -math.inf, 1e4, 1e4])
    return {"state_index": state_index, "state_log_score": state_log_score}


def test_exact_mode_refuses_missing_states_and_other_objectives_refuse_extras():
    objective = EMC2Objective(10, 4.0, exact=True)
    objective.chains.state_index[:2] = torch.tensor([7, 8])
    embeddings = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"states \[8\] are outside the batch.*states_to_encode"):
        objective(
            embeddings, torch.arange(2), extra_embeddings=torch.randn(1, 3), extra_dataset_indices=torch.tensor([7])
        )
    with pytest.raises(ValueError, match="takes no extra_embeddings"):
        SimCLRObjective(4.0)(embeddings, torch.arange(2), extra_embeddings=torch.randn(1, 3))
    with pytest.raises(ValueError, match="takes no extra_embeddings"):
        EMC2Objective(10, 4.0)(embeddings, torch.arange(2), extra_embeddings=torch.randn(1, 3))
    with pytest.raises(ValueError, match="emc2 objective only"):
        build_objective("sogclr", 10, 4.0, exact=True)
    assert build_objective("emc2", 10, 4.0, exact=True).get_config_dict()["exact"] is True
    assert "exact" not in build_objective("emc2", 10, 4.0).get_config_dict()


def test_the_exact_proposal_is_uniform_over_the_images_of_batch_and_start():
    # Anchor 0 has 6 in-batch negative columns (3 images × 2 views) and a re-encoded start in column 8 with 2 slots:
    # each of the 4 images is proposed with probability 1/4. Anchor 1 has no re-encoded start: 1/6 per column.
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 1:7] = True
    draws = 80_000
    proposals = proposals_with_start(mask, draws, torch.tensor([8, 0]), torch.tensor([2, 0]), keyed_generator(1))
    first = torch.bincount(proposals[0], minlength=9).float() / draws
    second = torch.bincount(proposals[1], minlength=9).float() / draws
    assert torch.allclose(first[1:7], torch.full((6,), 1 / 8), atol=0.006)
    assert first[8].item() == pytest.approx(1 / 4, abs=0.006) and first[[0, 7]].sum() == 0
    assert torch.allclose(second[1:7], torch.full((6,), 1 / 6), atol=0.006) and second[[0, 7, 8]].sum() == 0


# ---- ContrastiveTrainer ----


def trainer_arguments(output_dir, **overrides):
    from emc2_hf import ContrastiveTrainingArguments

    values = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "max_steps": 5,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        "emc2_exact": True,
    }
    values.update(overrides)
    return ContrastiveTrainingArguments(**values)


def test_exact_mode_trains_logs_and_resumes_like_the_default_mode(tmp_path, digits):
    from emc2_hf import (
        ContrastiveCollator,
        ContrastiveEncoder,
        ContrastiveEncoderConfig,
        ContrastiveTrainer,
        SimCLRAugmentation,
    )

    train = digits["train"].select(range(24))  # 3 steps per epoch at b = 8: states leave the batch from step 3 on

    def run(output_dir, resume=None, **overrides):
        torch.manual_seed(0)
        trainer = ContrastiveTrainer(
            model=ContrastiveEncoder(ContrastiveEncoderConfig(backbone="test_resnet", projection_dim=16)),
            args=trainer_arguments(output_dir, **overrides),
            train_dataset=train,
            data_collator=ContrastiveCollator(augmentation=SimCLRAugmentation(image_size=16, crop_scale=(0.5, 1.0))),
        )
        result = trainer.train(resume_from_checkpoint=resume)
        return trainer, result

    uninterrupted, result = run(tmp_path / "a", save_strategy="steps", save_steps=4)
    assert math.isfinite(result.training_loss)
    assert uninterrupted.objective.exact and uninterrupted.objective.get_config_dict()["exact"] is True
    logs = [log for log in uninterrupted.state.log_history if "loss" in log]
    assert len(logs) == 5 and all(math.isfinite(log["loss"]) for log in logs)
    assert all(log["outside_batch_sample_fraction"] == 0.0 for log in logs)
    assert max(log["reencoded_fraction"] for log in logs) > 0  # epoch 1 starts on states from epoch 0
    # Resumed from step 4 (the re-encoding already under way), the run continues bit for bit.
    resumed, _ = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"))
    for (name, a), b in zip(
        uninterrupted.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    for name, value in uninterrupted.objective.state_dict().items():
        assert torch.equal(value, resumed.objective.state_dict()[name]), name


def test_emc2_exact_is_an_emc2_argument(tmp_path):
    assert trainer_arguments(tmp_path).emc2_exact
    with pytest.raises(ValueError, match="--emc2_exact applies to --objective emc2 only"):
        trainer_arguments(tmp_path, objective="simclr")


# ---- Two processes: N × b/N images with the trainer's re-encoding == 1 × b images by definition ----


class LinearEncoder(nn.Module):
    """No BatchNorm, so encoding images in separate processes or together gives the same embeddings."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * image_size * image_size, 6)

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        from emc2_hf.modeling.encoder import ContrastiveEncoderOutput

        return ContrastiveEncoderOutput(embeddings=self.linear(pixel_values.flatten(1)))


def distributed_worker(output_dir: str) -> None:
    import torch.distributed as dist

    from emc2_hf import ContrastiveCollator, ContrastiveTrainer, SimCLRAugmentation, load_digits_dataset

    torch.manual_seed(0)
    model = LinearEncoder(16)
    reference_model = copy.deepcopy(model)
    collator = ContrastiveCollator(augmentation=SimCLRAugmentation(image_size=16), seed=0)
    args = trainer_arguments(
        os.path.join(output_dir, "run"), per_device_train_batch_size=4, ddp_backend="gloo", seed=1
    )
    trainer = ContrastiveTrainer(
        model=model,
        args=args,
        train_dataset=load_digits_dataset(image_size=16)["train"].select(range(20)),
        data_collator=collator,
    )
    rank, size = dist.get_rank(), dist.get_world_size()
    reference = EMC2Objective(20, args.inverse_temperature, seed=1, exact=True)
    generator = torch.Generator().manual_seed(0)
    # Chains already on states from earlier batches (never the image itself), with stale scores.
    offsets = torch.randint(1, 20, (20,), generator=generator)
    initial = {
        "state_index": (torch.arange(20) + offsets) % 20,
        "state_log_score": torch.randn(20, generator=generator),
    }
    trainer.objective.chains.load_state_dict(initial)
    reference.chains.load_state_dict(initial)
    checks = []
    for step in range(3):
        trainer.state.global_step = step
        indices = torch.randperm(20, generator=generator)[: 4 * size]
        rows = [trainer.train_dataset[index] for index in indices.tolist()]
        pixel_values = collator(rows)["pixel_values"]  # [2 · 4N, ...]: view 1 of every image, then view 2
        num = 4 * size
        local = slice(rank * 4, (rank + 1) * 4)
        inputs = {
            "pixel_values": torch.cat([pixel_values[:num][local], pixel_values[num:][local]]),
            "dataset_index": indices[local],
        }
        loss = trainer.compute_loss(model, inputs)
        model.zero_grad()
        loss.backward()
        for parameter in model.parameters():  # what DDP does
            dist.all_reduce(parameter.grad)
            parameter.grad /= size

        states = reference.states_to_encode(indices)
        state_images = [trainer.train_dataset[index]["image"] for index in states.tolist()]
        extra = reference_model(pixel_values=collator.eval_pixel_values(state_images)).embeddings
        reference_loss = reference(
            reference_model(pixel_values=pixel_values).embeddings,
            indices,
            step=step,
            extra_embeddings=extra,
            extra_dataset_indices=states,
        ).loss
        reference_model.zero_grad()
        reference_loss.backward()
        checks.append(
            {
                "num_states": states.numel(),
                "loss_equal": abs(loss.item() - reference_loss.item()) < 1e-6,
                "grad_close": all(
                    torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-5)  # float sums in another order
                    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True)
                ),
                "index_equal": torch.equal(trainer.objective.chains.state_index, reference.chains.state_index),
                "score_close": torch.allclose(
                    trainer.objective.chains.state_log_score, reference.chains.state_log_score, atol=1e-5
                ),
            }
        )
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
                p -= 0.5 * p.grad
                q -= 0.5 * q.grad
    with open(os.path.join(output_dir, f"exact-rank{rank}.json"), "w") as handle:
        json.dump(checks, handle)


@pytest.mark.slow
def test_two_processes_reencode_their_shares_and_match_one_process(tmp_path):
    result = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "torchrun"),
            "--nproc_per_node",
            "2",
            "--standalone",
            "tests/test_exact_mode.py",
            "distributed",
            str(tmp_path),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for rank in (0, 1):
        checks = json.loads((tmp_path / f"exact-rank{rank}.json").read_text())
        assert sum(check.pop("num_states") for check in checks) > 0
        for step, check in enumerate(checks):
            assert all(check.values()), (rank, step, check)


if __name__ == "__main__":
    {"distributed": distributed_worker}[sys.argv[1]](sys.argv[2])
