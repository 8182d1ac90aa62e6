"""The Metropolis–Hastings sweep and EMC²'s chains against their definitions (eq. (5), (9); Algorithm 1)."""

import math

import pytest
import torch

from emc2_hf.objectives import EMC2InBatchObjective, EMC2Objective
from emc2_hf.sampling import OUTSIDE_BATCH, keyed_generator, metropolis_hastings_sweep, uniform_proposals


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def test_acceptance_probability_is_min_one_exp_score_difference():
    # Anchors sit on column 0 (log-score 0) and always propose column 1 (log-score Δ): accept w.p. min(1, e^Δ).
    deltas = torch.tensor([-2.0, -0.5, 0.0, 1.0])
    num_chains = 20_000
    log_scores = torch.stack([torch.zeros(4), deltas], dim=1).repeat_interleave(num_chains, dim=0)
    proposals = torch.ones((4 * num_chains, 1), dtype=torch.long)
    result = metropolis_hastings_sweep(
        log_scores,
        proposals,
        torch.zeros(4 * num_chains, dtype=torch.long),
        torch.zeros(4 * num_chains),
        burn_in=0,
        generator=keyed_generator(0, "acceptance"),
    )
    empirical = (result.final_column == 1).float().view(4, num_chains).mean(dim=1)
    expected = deltas.exp().clamp(max=1.0)
    assert torch.allclose(empirical, expected, atol=0.015), (empirical, expected)
    assert result.num_accepted.sum().item() == (result.final_column == 1).sum().item()


def test_empty_chain_accepts_its_first_proposal_and_samples_skip_burn_in():
    log_scores = torch.randn(3, 5)
    proposals = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0], [4, 3, 2, 1]])
    result = metropolis_hastings_sweep(
        log_scores,
        proposals,
        torch.full((3,), OUTSIDE_BATCH),
        torch.full((3,), float("-inf")),
        burn_in=2,
        generator=keyed_generator(1),
    )
    assert result.samples.shape == (3, 2)
    assert (result.samples != OUTSIDE_BATCH).all()
    assert result.samples[1].tolist() == [0, 0]


def test_uniform_proposals_cover_exactly_the_negatives_uniformly():
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[torch.arange(4), torch.arange(4)] = False
    mask[:, 5] = False
    proposals = uniform_proposals(mask, 40_000, keyed_generator(2))
    for anchor in range(4):
        counts = torch.bincount(proposals[anchor], minlength=6).float() / 40_000
        allowed = mask[anchor]
        assert counts[~allowed].sum() == 0
        assert torch.allclose(counts[allowed], torch.full((4,), 0.25), atol=0.01)


def test_uneven_candidate_counts_are_rejected():
    mask = torch.tensor([[False, True, True], [True, False, False]])
    with pytest.raises(ValueError, match="same, non-zero number of candidate negatives"):
        uniform_proposals(mask, 3)


def test_burn_in_must_leave_samples():
    with pytest.raises(ValueError, match="burn_in"):
        metropolis_hastings_sweep(
            torch.zeros(1, 2),
            torch.zeros(1, 2, dtype=torch.long),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1),
            burn_in=2,
        )


def frozen_embeddings(num_images: int, dim: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(num_images, dim, generator=generator), dim=1)


def global_softmax(features: torch.Tensor, beta: float, image: int) -> torch.Tensor:
    """Eq. (5) over the other images for anchor ``image`` (all views identical)."""
    logits = beta * features @ features[image]
    logits[image] = float("-inf")
    return logits.softmax(dim=0)


@pytest.mark.parametrize("objective_class", [EMC2Objective, EMC2InBatchObjective])
def test_visit_frequencies_converge_to_the_softmax_over_negatives_when_the_batch_holds_every_negative(objective_class):
    # With every image in the batch, the chains run exact M-H among all negatives: visit frequencies → eq. (5).
    # (Measured max TV over images, exact objective: 0.032 / 0.015 / 0.004 after 400 / 1,600 / 6,400 steps: noise.)
    num_images, beta, steps = 6, 3.0, 1600
    features = frozen_embeddings(num_images)
    objective = objective_class(num_images, beta, seed=3)
    visits = torch.zeros(num_images, num_images)
    for step in range(steps):
        order = torch.randperm(num_images, generator=torch.Generator().manual_seed(step))
        embeddings = torch.cat([features[order], features[order]])
        with torch.no_grad():
            weights, _ = objective.negative_weights(objective_pairs(embeddings, order), keyed_generator(3, step))
        per_image = weights[:, :num_images] + weights[:, num_images:]  # both views of each candidate image
        visits.index_add_(0, order, per_image[:num_images][:, torch.argsort(order)] * 0.5)
        visits.index_add_(0, order, per_image[num_images:][:, torch.argsort(order)] * 0.5)
    visits /= steps
    for image in range(num_images):
        tv = total_variation(visits[image], global_softmax(features, beta, image))
        assert tv < 0.03, (image, tv, visits[image], global_softmax(features, beta, image))


def objective_pairs(embeddings: torch.Tensor, dataset_indices: torch.Tensor):
    from emc2_hf.objectives import two_view_problem

    return two_view_problem(embeddings, dataset_indices)


def test_chain_states_converge_to_the_global_softmax_across_random_small_batches():
    # b < m: a chain's state is usually outside the batch. With one proposal per step each proposal is a uniform draw
    # from D_neg independent of the state, so even the in-batch variant's stored chain state is an exact M-H chain
    # whose law → eq. (5) (frozen features: its stored score is never stale).
    num_images, batch_images, beta, steps = 6, 3, 2.0, 6000
    features = frozen_embeddings(num_images, seed=1)
    objective = EMC2InBatchObjective(num_images, beta, num_proposals=1, burn_in=0, seed=4)
    histogram = torch.zeros(num_images, num_images)
    generator = torch.Generator().manual_seed(5)
    for step in range(steps):
        batch = torch.randperm(num_images, generator=generator)[:batch_images]
        with torch.no_grad():
            objective(torch.cat([features[batch], features[batch]]), batch, step=step)
        states = objective.chains.state_index[batch, 0]  # the chain of view 1 (slot 0)
        histogram[batch, states] += 1
    histogram /= histogram.sum(dim=1, keepdim=True)
    for image in range(num_images):
        expected = global_softmax(features, beta, image)
        assert histogram[image, image] == 0
        tv = total_variation(histogram[image], expected)
        assert tv < 0.04, (image, tv, histogram[image], expected)
    # The stored similarity is s of the stored state (frozen similarities: nothing is stale).
    stored = objective.chains.state_similarity[:, 0]
    expected = (features * features[objective.chains.state_index[:, 0]]).sum(dim=1)
    assert torch.allclose(stored, expected, atol=1e-5)


def test_outside_batch_samples_are_counted_and_keep_the_negative_term():
    # A chain parked on a very high stale score never leaves: all its samples are outside the batch, and its weight
    # mass goes to the in-batch softmax instead of vanishing.
    num_images = 8
    objective = EMC2InBatchObjective(num_images + 1, inverse_temperature=5.0, seed=0)
    objective.chains.state_index[:] = num_images  # an image that is never in the batch
    objective.chains.state_view[:] = 0
    objective.chains.state_similarity[:] = 1e4
    embeddings = torch.randn(2 * num_images, 5)
    with torch.no_grad():
        out = objective(embeddings, torch.arange(num_images), step=0)
    assert out.metrics["outside_batch_sample_fraction"].item() == 1.0
    assert out.metrics["acceptance_rate"].item() == 0.0
    assert (objective.chains.state_index[:num_images] == num_images).all()
    pairs = objective_pairs(embeddings, torch.arange(num_images))
    weights, _ = objective.negative_weights(pairs, keyed_generator(0))
    expected = (5.0 * pairs.similarities).masked_fill(~pairs.negative_mask, -math.inf).softmax(dim=1)
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(weights.sum(dim=1), torch.ones(2 * num_images))


def test_a_stored_state_that_is_in_the_batch_is_rescored_with_the_current_model():
    objective = EMC2InBatchObjective(4, inverse_temperature=4.0, num_proposals=1, burn_in=0, seed=0)
    objective.chains.state_index[:] = torch.tensor([1, 0, 3, 2])[:, None]
    objective.chains.state_view[:] = 0  # view 1 of those images, which the batch holds
    objective.chains.state_similarity[:] = 1e4  # stale and huge: would never be left if it were not re-scored
    embeddings = torch.nn.functional.normalize(torch.randn(8, 3), dim=1)
    with torch.no_grad():
        out = objective(embeddings, torch.arange(4), step=0)
    assert out.metrics["outside_batch_sample_fraction"].item() == 0.0
    assert objective.chains.state_similarity.max().item() <= 1.0 + 1e-5
