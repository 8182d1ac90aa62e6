"""Objectives against the mathematics: eq. (1), (2), (11) and SogCLR's moving average."""

import math

import pytest
import torch

from emc2_hf.objectives import (
    OBJECTIVES,
    EMC2Objective,
    SimCLRObjective,
    SogCLRObjective,
    build_objective,
    global_contrastive_loss,
    surrogate_loss,
    two_view_problem,
    visit_frequency_weights,
)
from emc2_hf.sampling import OUTSIDE_BATCH, keyed_generator, metropolis_hastings_sweep, uniform_proposals


def random_embeddings(num_views: int, dim: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_views, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u / u.norm()) @ (v / v.norm())


def test_surrogate_gradient_is_eq_11_computed_by_hand():
    beta, num_images, num_proposals, burn_in = 3.0, 4, 10, 4
    num_views = 2 * num_images
    embeddings = random_embeddings(num_views).requires_grad_(True)
    pairs = two_view_problem(embeddings, torch.arange(num_images))
    log_scores = beta * pairs.similarities.detach()
    # Half the chains start on a stale out-of-batch state with a high score, so some samples sit outside the batch.
    initial_column = torch.full((num_views,), OUTSIDE_BATCH)
    initial_log_score = torch.where(torch.arange(num_views) % 2 == 0, torch.tensor(2.5), torch.tensor(float("-inf")))
    generator = keyed_generator(7)
    proposals = uniform_proposals(pairs.negative_mask, num_proposals, generator)
    sweep = metropolis_hastings_sweep(log_scores, proposals, initial_column, initial_log_score, burn_in, generator)
    assert (sweep.samples == OUTSIDE_BATCH).any() and (sweep.samples != OUTSIDE_BATCH).any()

    weights = visit_frequency_weights(sweep.samples, log_scores, pairs.negative_mask)
    surrogate = surrogate_loss(pairs.similarities, pairs.positive_columns, weights, beta)
    (gradient,) = torch.autograd.grad(surrogate, embeddings)

    # Eq. (11) by hand: −β/B Σ_k ∇s(x_k, y_k) + β/(B(R−P)) Σ_k Σ_r ∇s(x_k, Z̃_k^(r)); a sample outside the batch
    # contributes the in-batch softmax average of ∇s over the anchor's negatives instead.
    by_hand = 0.0
    for anchor in range(num_views):
        positive = (anchor + num_images) % num_views
        by_hand = by_hand - beta * cosine(embeddings[anchor], embeddings[positive]) / num_views
        negatives = [c for c in range(num_views) if c % num_images != anchor % num_images]
        for sample in sweep.samples[anchor].tolist():
            if sample == OUTSIDE_BATCH:
                scores = torch.stack([cosine(embeddings[anchor], embeddings[c]) for c in negatives])
                term = (torch.softmax(beta * scores.detach(), dim=0) * scores).sum()
            else:
                assert sample in negatives
                term = cosine(embeddings[anchor], embeddings[sample])
            by_hand = by_hand + beta * term / (num_views * (num_proposals - burn_in))
    (expected,) = torch.autograd.grad(by_hand, embeddings)
    assert torch.allclose(gradient, expected, atol=1e-5)


def info_nce_by_hand(embeddings: torch.Tensor, beta: float) -> torch.Tensor:
    num_views = embeddings.shape[0]
    num_images = num_views // 2
    total = 0.0
    for anchor in range(num_views):
        positive = (anchor + num_images) % num_views
        others = torch.stack(
            [beta * cosine(embeddings[anchor], embeddings[c]) for c in range(num_views) if c != anchor]
        )
        total = total - beta * cosine(embeddings[anchor], embeddings[positive]) + torch.logsumexp(others, dim=0)
    return total / num_views


def test_simclr_value_and_gradient_match_the_closed_form_info_nce():
    beta = 2.0
    embeddings = random_embeddings(10, seed=1).requires_grad_(True)
    output = SimCLRObjective(beta)(embeddings, torch.arange(5))
    expected = info_nce_by_hand(embeddings, beta)
    assert output.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    (gradient,) = torch.autograd.grad(output.loss, embeddings)
    (expected_gradient,) = torch.autograd.grad(expected, embeddings)
    assert torch.allclose(gradient, expected_gradient, atol=1e-5)


# Objectives that run on the batch's embeddings alone; the negative cache also needs its re-encoded draws (its own
# tests: tests/test_negative_cache.py, and through the trainer in tests/test_mixed_precision.py).
BATCH_ONLY = [name for name, objective in OBJECTIVES.items() if not objective.reencodes_cache_negatives]


def test_every_objective_reports_the_batch_info_nce_as_its_value():
    embeddings = random_embeddings(8, seed=2)
    expected = info_nce_by_hand(embeddings, 4.0).item()
    for name in BATCH_ONLY:
        output = build_objective(name, num_samples=4, inverse_temperature=4.0)(embeddings, torch.arange(4))
        assert output.loss.item() == pytest.approx(expected, abs=1e-5), name


def sogclr_reference_step(u: dict, embeddings: torch.Tensor, indices: list, beta: float, gamma: float) -> tuple:
    """SogCLR's update in float64 straight from the formula; returns the per-anchor u used for the weights."""
    num_images = len(indices)
    num_views = 2 * num_images
    e = torch.nn.functional.normalize(embeddings.double(), dim=1)
    used = []
    for anchor in range(num_views):
        negatives = [c for c in range(num_views) if c % num_images != anchor % num_images]
        estimate = torch.stack([torch.exp(beta * e[anchor] @ e[c]) for c in negatives]).mean()
        image = indices[anchor % num_images]
        used.append(estimate if image not in u else (1 - gamma) * u[image] + gamma * estimate)
    for position, image in enumerate(indices):
        u[image] = (used[position] + used[position + num_images]) / 2
    return used


def test_sogclr_u_follows_its_moving_average_formula_and_weights_are_exp_over_u():
    beta, gamma, dataset_size = 3.0, 0.7, 6
    objective = SogCLRObjective(dataset_size, beta, gamma=gamma)
    reference: dict = {}
    batches = [[0, 1, 2], [2, 3, 4], [0, 4, 5], [1, 2, 3]]
    for step, batch in enumerate(batches):
        embeddings = random_embeddings(6, seed=10 + step)
        pairs = two_view_problem(embeddings, torch.tensor(batch))
        used = sogclr_reference_step(reference, embeddings, batch, beta, gamma)
        weights, _ = objective.negative_weights(pairs, keyed_generator(0))
        for anchor in range(6):
            for column in range(6):
                if pairs.negative_mask[anchor, column]:
                    expected = math.exp(beta * pairs.similarities[anchor, column].item()) / (4 * used[anchor].item())
                    assert weights[anchor, column].item() == pytest.approx(expected, rel=1e-5)
                else:
                    assert weights[anchor, column].item() == 0.0
    for image, value in reference.items():
        assert objective.moving_average.u[image].item() == pytest.approx(value.item(), rel=1e-5)
        assert bool(objective.moving_average.initialised[image])


def test_sogclr_does_not_overflow_at_beta_50():
    beta = 50.0
    objective = SogCLRObjective(4, beta, gamma=0.9)
    embeddings = random_embeddings(8, seed=3)
    embeddings[4:] = embeddings[:4] + 1e-3  # near-identical views: similarities close to 1, exp(50) ≈ 5e21
    for step in range(3):
        output = objective(embeddings.clone().requires_grad_(True), torch.arange(4), step=step)
        assert torch.isfinite(output.loss)
        assert torch.isfinite(objective.moving_average.log_u).all()
    reference: dict = {}
    for _ in range(3):
        sogclr_reference_step(reference, embeddings, [0, 1, 2, 3], beta, 0.9)
    assert torch.allclose(
        objective.moving_average.log_u.double(), torch.stack([reference[i] for i in range(4)]).log(), rtol=1e-5
    )
    weights, _ = objective.negative_weights(two_view_problem(embeddings, torch.arange(4)), keyed_generator(0))
    assert torch.isfinite(weights).all()


def test_emc2_draws_are_reproducible_from_seed_and_step():
    embeddings = random_embeddings(16, seed=4)

    def weights_at(step: int, seed: int = 0) -> torch.Tensor:
        objective = EMC2Objective(8, 5.0, seed=seed)
        return objective.negative_weights(
            two_view_problem(embeddings, torch.arange(8)), keyed_generator(seed, "emc2", step)
        )[0]

    assert torch.equal(weights_at(3), weights_at(3))
    assert not torch.equal(weights_at(3), weights_at(4))
    assert not torch.equal(weights_at(3), weights_at(3, seed=1))


def test_objectives_compute_in_float32_under_bfloat16_embeddings():
    embeddings = random_embeddings(8, seed=5).bfloat16().requires_grad_(True)
    for name in BATCH_ONLY:
        objective = build_objective(name, num_samples=4, inverse_temperature=14.28)
        output = objective(embeddings, torch.arange(4))
        assert output.loss.dtype == torch.float32
        output.loss.backward()
        assert torch.isfinite(embeddings.grad).all()
        embeddings.grad = None
    emc2 = build_objective("emc2", num_samples=4, inverse_temperature=14.28)
    emc2(embeddings, torch.arange(4))
    assert emc2.chains.state_similarity.dtype == torch.float32


def brute_force_global_loss(features: torch.Tensor, beta: float) -> torch.Tensor:
    num_images, num_views, _ = features.shape
    total, count = 0.0, 0
    for i in range(num_images):
        for a in range(num_views):
            negatives = torch.stack(
                [
                    beta * cosine(features[i, a], features[j, c])
                    for j in range(num_images)
                    if j != i
                    for c in range(num_views)
                ]
            )
            for a2 in range(num_views):
                if a2 != a:
                    total = total - beta * cosine(features[i, a], features[i, a2]) + torch.logsumexp(negatives, dim=0)
                    count += 1
    return total / count


@pytest.mark.parametrize("num_views", [2, 3])
def test_global_contrastive_loss_matches_a_brute_force_loop(num_views):
    features = torch.randn(5, num_views, 4, generator=torch.Generator().manual_seed(num_views)).requires_grad_(True)
    value = global_contrastive_loss(features, 2.5, chunk_size=3)
    expected = brute_force_global_loss(features, 2.5)
    assert value.item() == pytest.approx(expected.item(), abs=1e-5)
    (gradient,) = torch.autograd.grad(value, features)
    (expected_gradient,) = torch.autograd.grad(expected, features)
    assert torch.allclose(gradient, expected_gradient, atol=1e-5)


def test_surrogate_with_exact_softmax_weights_has_the_gradient_of_the_global_loss():
    # With the whole dataset in the batch and w = eq. (5), eq. (11)'s expectation is ∇L of eq. (1).
    num_images, beta = 6, 3.0
    features = torch.randn(num_images, 2, 5, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    embeddings = torch.cat([features[:, 0], features[:, 1]])
    pairs = two_view_problem(embeddings, torch.arange(num_images))
    exact = (beta * pairs.similarities.detach()).masked_fill(~pairs.negative_mask, -math.inf).softmax(dim=1)
    (gradient,) = torch.autograd.grad(
        surrogate_loss(pairs.similarities, pairs.positive_columns, exact, beta), features
    )
    (expected,) = torch.autograd.grad(global_contrastive_loss(features, beta), features)
    assert torch.allclose(gradient, expected, atol=1e-5)


def test_global_contrastive_loss_fits_two_thousand_images():
    features = torch.randn(2000, 2, 32).requires_grad_(True)
    value = global_contrastive_loss(features, 5.0)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(features.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "emc2", "inverse_temperature": 0.0}, "inverse_temperature must be > 0"),
        ({"name": "emc2", "inverse_temperature": 5.0, "num_proposals": 4, "burn_in": 4}, "burn_in"),
        ({"name": "emc2", "inverse_temperature": 5.0, "num_proposals": 0}, "num_proposals"),
        ({"name": "sogclr", "inverse_temperature": 5.0, "gamma": 0.0}, "sogclr_gamma"),
        ({"name": "moco", "inverse_temperature": 5.0}, "unknown objective 'moco'"),
        ({"name": "sogclr", "inverse_temperature": 5.0, "num_proposals": 4}, r"--num_proposals applies to .*'emc2'"),
        ({"name": "simclr", "inverse_temperature": 5.0, "gamma": 0.5}, r"--sogclr_gamma applies to .*'sogclr'"),
    ],
)
def test_bad_hyper_parameters_are_rejected_with_their_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_objective(num_samples=4, **kwargs)


def test_default_burn_in_larger_than_the_batch_allows_is_explained():
    objective = EMC2Objective(4, 5.0, burn_in=10)
    with pytest.raises(ValueError, match="lower --burn_in, set --num_proposals, or raise the batch size"):
        objective(random_embeddings(8), torch.arange(4))
    with pytest.raises(ValueError, match=r"2b − 2 = 6 for a batch of b = 4"):
        objective.validate_batch_size(4)  # what the trainer checks before any work
    objective.validate_batch_size(8)


def test_a_batch_of_one_image_has_no_negatives():
    for name in OBJECTIVES:
        with pytest.raises(ValueError, match="at least 2 images per batch"):
            build_objective(name, num_samples=4, inverse_temperature=5.0)(random_embeddings(2), torch.tensor([0]))


def test_objective_variants_are_named_by_a_spec_string():
    from emc2_hf.objectives import parse_objective_spec

    assert parse_objective_spec("emc2") == ("emc2", {})
    name, options = parse_objective_spec("emc2:weighting=samples,chain_fraction=0.5,num_proposals=10")
    assert name == "emc2" and options == {"weighting": "samples", "chain_fraction": 0.5, "num_proposals": 10}
    objective = build_objective(name, 8, 5.0, **options)
    assert objective.get_config_dict()["weighting"] == "samples" and objective.chain_fraction == 0.5
    with pytest.raises(ValueError, match="unknown objective 'moco'"):
        parse_objective_spec("moco:x=1")
    with pytest.raises(ValueError, match="not key=value"):
        parse_objective_spec("emc2:weighting")
    with pytest.raises(ValueError, match="weighting must be one of"):
        build_objective("emc2_in_batch", 8, 5.0, weighting="conditional")  # needs the start in the candidate set
    with pytest.raises(ValueError, match="chain_fraction applies to the emc2 objective"):
        build_objective("emc2_in_batch", 8, 5.0, chain_fraction=0.5)
    with pytest.raises(ValueError, match=r"--emc2_chain_fraction applies to .*'emc2'"):
        build_objective("simclr", 8, 5.0, chain_fraction=0.5)
