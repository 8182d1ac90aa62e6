"""The negative-cache baseline (Lindgren et al., 2021) against its definitions: Gumbel-max draws from the softmax over
the cache, the round-robin refresh, the weights/gradient of the surrogate, checkpointing and the errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from emc2_hf.objectives import NO_STATE, info_nce_loss, two_view_problem
from emc2_hf.objectives.negative_cache import EmbeddingCache, NegativeCacheObjective
from emc2_hf.sampling.sample_state import load_per_sample_state, save_per_sample_state

NUM_DRAWS = 20_000
OWN_KEY = 0
UNFILLED = (4, 9)


def _small_cache(num_samples: int = 12, dim: int = 4, chunk_elements: int = 12 * 4096) -> EmbeddingCache:
    """A cache of random unit features with the entries ``UNFILLED`` never written."""
    cache = EmbeddingCache(num_samples, dim, chunk_elements=chunk_elements)
    keys = torch.tensor([k for k in range(num_samples) if k not in UNFILLED])
    cache.write(keys, torch.randn(keys.numel(), dim, generator=torch.Generator().manual_seed(1)), step=0)
    return cache


def _softmax_over_allowed(cache: EmbeddingCache, anchor: torch.Tensor, beta: float) -> torch.Tensor:
    """``FloatTensor[m]``: ``softmax(β ⟨anchor, cache_z⟩)`` over the filled entries other than ``OWN_KEY``."""
    logits = (beta * cache.embeddings @ anchor).double()
    allowed = cache.filled.clone()
    allowed[OWN_KEY] = False
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=0)


def _tv_tolerance(probabilities: torch.Tensor, num_draws: int) -> float:
    """3.5× the expected total-variation distance of an ``num_draws``-sample empirical distribution from its law:
    ``E|p̂_z − p_z| ≈ sqrt(2 p_z (1 − p_z) / (π N))`` (half-normal), so ``E[TV] ≈ ½ Σ_z sqrt(2 p_z (1 − p_z) / (π N))``.
    """
    expected = 0.5 * torch.sqrt(2 * probabilities * (1 - probabilities) / (math.pi * num_draws)).sum().item()
    return 3.5 * expected


def _frequencies(draws: torch.Tensor, num_samples: int) -> torch.Tensor:
    return torch.bincount(draws, minlength=num_samples).double() / draws.numel()


def _anchor(dim: int = 4) -> torch.Tensor:
    return F.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(2)), dim=0)


def test_gumbel_max_frequencies_match_the_softmax_over_the_cache():
    cache, anchor, beta = _small_cache(), _anchor(), 3.0
    probabilities = _softmax_over_allowed(cache, anchor, beta)
    tolerance = _tv_tolerance(probabilities, NUM_DRAWS)
    # Here E[TV] ≈ 0.0051 (N = 20,000, 9 allowed entries), so the tolerance is 3.5× it ≈ 0.018 < 0.02.
    assert tolerance < 0.02
    draws = cache.sample(
        anchor.expand(NUM_DRAWS, -1),  # one call, the anchor repeated: 20,000 independent draws (in 5 chunks)
        torch.full((NUM_DRAWS,), OWN_KEY),
        beta,
        num_negatives=1,
        generator=torch.Generator().manual_seed(3),
    )
    assert draws.shape == (NUM_DRAWS, 1) and draws.dtype == torch.long
    frequencies = _frequencies(draws[:, 0], cache.num_samples)
    assert frequencies[[OWN_KEY, *UNFILLED]].sum() == 0  # the own example and unfilled entries are never drawn
    total_variation = 0.5 * (frequencies - probabilities).abs().sum().item()
    assert total_variation < tolerance


def test_gumbel_top_n_draws_without_replacement_with_softmax_first_draw():
    cache, anchor, beta = _small_cache(), _anchor(), 3.0
    probabilities = _softmax_over_allowed(cache, anchor, beta)
    draws = cache.sample(
        anchor.expand(NUM_DRAWS, -1),
        torch.full((NUM_DRAWS,), OWN_KEY),
        beta,
        num_negatives=3,
        generator=torch.Generator().manual_seed(4),
    )
    assert draws.shape == (NUM_DRAWS, 3)
    ordered = draws.sort(dim=1).values
    assert (ordered[:, 1:] != ordered[:, :-1]).all()  # no repeats within an anchor's draw
    assert not torch.isin(draws, torch.tensor([OWN_KEY, *UNFILLED])).any()
    tolerance = _tv_tolerance(probabilities, NUM_DRAWS)
    first = _frequencies(draws[:, 0], cache.num_samples)
    assert 0.5 * (first - probabilities).abs().sum().item() < tolerance
    # Second draw of Plackett–Luce sampling without replacement: P(z₂ = j) = Σ_{i ≠ j} p_i p_j / (1 − p_i).
    joint = probabilities[:, None] * probabilities[None, :] / (1 - probabilities[:, None])
    second_law = (joint - torch.diag(joint.diagonal())).sum(dim=0)
    second = _frequencies(draws[:, 1], cache.num_samples)
    assert 0.5 * (second - second_law).abs().sum().item() < _tv_tolerance(second_law, NUM_DRAWS)


def test_refresh_is_round_robin_and_covers_the_cache():
    cache = EmbeddingCache(10, 2)
    count = cache.refresh_count(0.3)
    assert count == 3  # ⌈0.3 · 10⌉, not 4 from 0.3 · 10 = 3.0000000000000004
    steps = [cache.next_refresh_keys(count).tolist() for _ in range(4)]  # ⌈1/ρ⌉ = 4 steps
    assert steps == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]
    assert sorted(set(sum(steps, []))) == list(range(10))
    assert cache.refresh_position.item() == 2 and cache.refresh_position.ndim == 0  # wrapped around m
    six_more = torch.cat([cache.next_refresh_keys(count) for _ in range(6)])
    assert (torch.bincount(torch.cat([torch.tensor(sum(steps, [])), six_more]), minlength=10) == 3).all()

    full = EmbeddingCache(10, 2)
    assert full.refresh_count(1.0) == 10
    for _ in range(3):
        assert full.next_refresh_keys(10).tolist() == list(range(10))
    assert full.refresh_position.item() == 0
    assert full.refresh_count(0.001) == 1  # at least one entry per step


@pytest.mark.parametrize("num_negatives", [1, 2])
def test_weights_are_sample_counts_and_the_gradient_is_the_negative_cache_estimate(num_negatives):
    beta, dim, num_images = 2.5, 4, 3
    objective = NegativeCacheObjective(10, beta, embedding_dim=dim, refresh_fraction=0.5, num_negatives=num_negatives)
    objective.write_cache(torch.arange(10), torch.randn(10, dim, generator=torch.Generator().manual_seed(5)), step=0)
    batch = torch.arange(num_images)
    embeddings = torch.randn(2 * num_images, dim, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    anchor_keys = batch.repeat(2)
    samples = objective.sample_negatives(embeddings.detach(), anchor_keys, step=7)
    assert samples.shape == (2 * num_images, num_negatives)
    assert (samples != anchor_keys[:, None]).all()

    # State columns: the distinct sampled keys, in a shuffled order, plus one key nobody sampled.
    distinct = objective.negatives_to_encode(samples)
    unused = [k for k in range(10) if k not in distinct.tolist()][:1]
    state_keys = torch.cat([distinct.flip(0), torch.tensor(unused, dtype=torch.long)])
    num_states = state_keys.numel()
    state_embeddings = torch.randn(num_states, dim, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    problem = two_view_problem(
        embeddings,
        batch,
        state_embeddings=state_embeddings,
        state_keys=state_keys,
        state_views=torch.full((num_states,), NO_STATE),
        start_keys=samples[:, 0],
        start_views=torch.full((2 * num_images,), NO_STATE),
    )
    weights, metrics = objective.negative_weights(problem, torch.Generator())

    expected = torch.zeros(2 * num_images, 2 * num_images + num_states)
    for anchor in range(2 * num_images):
        for key in samples[anchor].tolist():
            expected[anchor, 2 * num_images + state_keys.tolist().index(key)] += 1.0 / num_negatives
    assert torch.equal(weights, expected)
    assert (weights[:, : 2 * num_images] == 0).all()  # the batch's own views are not negatives of the cache
    assert metrics["cache_filled_fraction"].item() == 1.0
    assert metrics["cache_staleness_steps"].item() == 7.0

    # End to end: the loss's gradient is β (mean_j ∇s(a, z*_j) − ∇s(a, p(a))), averaged over the anchors.
    objective.sample_negatives(embeddings.detach(), anchor_keys, step=7)  # the same keyed draw again
    output = objective(problem)
    gradients = torch.autograd.grad(output.loss, (embeddings, state_embeddings))
    anchors, states = F.normalize(embeddings, dim=1), F.normalize(state_embeddings, dim=1)
    positives = (torch.arange(2 * num_images) + num_images) % (2 * num_images)
    columns = torch.tensor([[state_keys.tolist().index(k) for k in row] for row in samples.tolist()])
    negative_similarity = (anchors[:, None, :] * states[columns]).sum(dim=-1).mean(dim=1)  # (1/n) Σ_j s(a, z*_j)
    positive_similarity = (anchors * anchors[positives]).sum(dim=1)
    by_hand = beta * (negative_similarity - positive_similarity).mean()
    expected_gradients = torch.autograd.grad(by_hand, (embeddings, state_embeddings))
    for got, want in zip(gradients, expected_gradients, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    # The loss's value is the batch's InfoNCE, as for every objective.
    reported = info_nce_loss(problem.batch_similarities.detach(), problem.positive_columns, beta)
    assert output.loss.item() == pytest.approx(reported.item(), rel=1e-6)


def test_state_dict_round_trip_resumes_sampling_and_refresh(tmp_path):
    def build() -> NegativeCacheObjective:
        return NegativeCacheObjective(10, 4.0, embedding_dim=3, refresh_fraction=0.3, num_negatives=2, seed=11)

    objective = build()
    objective.write_cache(torch.arange(10), torch.randn(10, 3, generator=torch.Generator().manual_seed(8)), step=0)
    for step in range(2):
        keys = objective.refresh_keys(step)
        objective.write_cache(keys, torch.randn(keys.numel(), 3, generator=torch.Generator().manual_seed(9 + step)))
    assert objective.cache.written_step[:6].tolist() == [0, 0, 0, 1, 1, 1]
    assert set(objective.state_dict()) == {
        "cache.embeddings",
        "cache.filled",
        "cache.written_step",
        "cache.refresh_position",
    }
    assert objective.cache.bytes_per_example == 4 * 3 + 1 + 4

    restored, from_file = build(), build()
    restored.load_state_dict(objective.state_dict())
    save_per_sample_state(objective, tmp_path)
    assert load_per_sample_state(from_file, tmp_path)
    anchors = torch.randn(6, 3, generator=torch.Generator().manual_seed(10))
    anchor_keys = torch.tensor([0, 1, 2, 0, 1, 2])
    samples = objective.sample_negatives(anchors, anchor_keys, step=5, micro_step=1)
    assert torch.equal(restored.sample_negatives(anchors, anchor_keys, step=5, micro_step=1), samples)
    assert torch.equal(from_file.sample_negatives(anchors, anchor_keys, step=5, micro_step=1), samples)
    assert not torch.equal(objective.sample_negatives(anchors, anchor_keys, step=6, micro_step=1), samples)
    next_keys = objective.refresh_keys(2)
    assert next_keys.tolist() == [6, 7, 8]
    assert torch.equal(restored.refresh_keys(2), next_keys) and torch.equal(from_file.refresh_keys(2), next_keys)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="--cache_refresh_fraction must be in \\(0, 1\\]"):
        NegativeCacheObjective(10, 2.0, refresh_fraction=0.0)
    with pytest.raises(ValueError, match="--cache_refresh_fraction"):
        NegativeCacheObjective(10, 2.0, refresh_fraction=1.5)
    with pytest.raises(ValueError, match="--cache_negatives must be >= 1"):
        NegativeCacheObjective(10, 2.0, num_negatives=0)

    objective = NegativeCacheObjective(10, 2.0, embedding_dim=3, num_negatives=1)
    embeddings = torch.randn(4, 3, generator=torch.Generator().manual_seed(12))
    batch = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="fill the cache"):
        objective.sample_negatives(embeddings, batch.repeat(2), step=0)  # nothing written yet
    objective.write_cache(torch.arange(10), torch.randn(10, 3, generator=torch.Generator().manual_seed(13)))
    with pytest.raises(RuntimeError, match="call sample_negatives"):
        objective(embeddings, batch)

    samples = objective.sample_negatives(embeddings, batch.repeat(2), step=0)
    missing = [int(samples[0, 0])]  # one sampled key without a state column
    present = samples[:, 0].unique()
    present = present[present != missing[0]]
    with pytest.raises(ValueError, match=re.escape(f"sampled cache negatives {missing}")):
        objective(
            embeddings,
            batch,
            state_embeddings=torch.randn(present.numel(), 3),
            state_keys=present,
            state_views=torch.full((present.numel(),), NO_STATE),
            start_keys=torch.full((4,), NO_STATE),
            start_views=torch.full((4,), NO_STATE),
        )
    with pytest.raises(ValueError, match="shape \\[2, 3\\]"):
        objective.write_cache(torch.tensor([0, 1]), torch.randn(2, 5))


def test_a_step_whose_anchors_all_draw_one_image_trains_a_batch_norm_encoder(tmp_path, digits, monkeypatch):
    """All anchors may draw the same negative (a hub of the cache). The drawn images are encoded in the views'
    forward pass (train mode, BatchNorm over views and negatives together), so one draw is no batch-of-one error,
    and it gets gradient."""
    from test_trainer import arguments, collator, tiny_encoder

    from emc2_hf import ContrastiveTrainer

    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=arguments(tmp_path, objective="negative_cache", max_steps=2),
        train_dataset=digits["train"].select(range(32)),
        data_collator=collator(),
    )
    sample = trainer.objective.cache.sample

    def one_hub(anchor_features, anchor_keys, inverse_temperature, num_negatives, generator):
        drawn = sample(anchor_features, anchor_keys, inverse_temperature, num_negatives, generator)
        hub = 31 if 31 not in anchor_keys.tolist() else 30
        return torch.full_like(drawn, hub)

    monkeypatch.setattr(trainer.objective.cache, "sample", one_hub)
    seen = []
    negative_weights = trainer.objective.negative_weights

    def record(problem, generator):
        seen.append((problem.similarities.shape[1] - problem.num_batch_columns, problem.similarities.requires_grad))
        return negative_weights(problem, generator)

    monkeypatch.setattr(trainer.objective, "negative_weights", record)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert seen == [(1, True), (1, True)]  # one state column, differentiable, each step
