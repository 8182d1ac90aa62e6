"""High-loss batch selection (Cho et al., 2023) against its definitions: SC's equal-size high-affinity partition,
Ordered SGD's argmax over candidates, sharding into per-process chunks, resumption and determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate.data_loader import BatchSamplerShard
from safetensors.torch import load_file, save_file

from emc2_hf.objectives import info_nce_loss, two_view_problem
from emc2_hf.sampling.batch_selection import (
    BATCH_SELECTIONS,
    HighLossBatchSampler,
    OrderedSGDBatchSampler,
    SpectralClusteringBatchSampler,
    balanced_assignment,
    build_batch_sampler,
    contrastive_affinity,
)


def random_embeddings(num_samples: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """``FloatTensor[m, 2, dim]``: two correlated views of random unit vectors (not normalised)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(num_samples, 1, dim, generator=generator)
    return base + 0.5 * torch.randn(num_samples, 2, dim, generator=generator)


def planted_two_clusters(noise: float = 0.05) -> tuple[torch.Tensor, list[set[int]]]:
    """32 examples, odd and even indices near two orthogonal directions: ``([32, 2, 8], [evens, odds])``."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(32) % 2
    embeddings = torch.eye(8)[labels][:, None, :] + noise * torch.randn(32, 2, 8, generator=generator)
    return embeddings, [set(range(0, 32, 2)), set(range(1, 32, 2))]


def reference_loss(embeddings: torch.Tensor, batch: torch.Tensor, beta: float, same_view_negatives: bool) -> float:
    """The batch's loss recomputed independently with the library's InfoNCE (eq. (2))."""
    views = embeddings[batch]
    if same_view_negatives:  # SimCLR's NT-Xent over the 2b views
        problem = two_view_problem(torch.cat([views[:, 0], views[:, 1]]), batch, inverse_temperature=beta)
        return info_nce_loss(problem.similarities, problem.positive_columns, beta).item()
    similarities = F.normalize(views[:, 0], dim=-1) @ F.normalize(views[:, 1], dim=-1).T  # images × texts
    everything = torch.ones_like(similarities, dtype=torch.bool)
    positives = torch.arange(batch.numel())
    image_to_text = info_nce_loss(similarities, positives, beta, everything)
    text_to_image = info_nce_loss(similarities.T, positives, beta, everything)
    return 0.5 * (image_to_text + text_to_image).item()


def test_spectral_batches_are_an_equal_size_partition_dropping_the_remainder():
    num_samples, size = 100, 16
    sampler = SpectralClusteringBatchSampler(num_samples, size, seed=3)
    sampler.update(random_embeddings(num_samples), inverse_temperature=5.0, epoch=0)
    batches = sampler.batches()
    assert batches.shape == (num_samples // size, size)
    flat = batches.flatten().tolist()
    assert len(set(flat)) == len(flat) == (num_samples // size) * size  # no index twice; 100 mod 16 = 4 dropped
    assert all(0 <= index < num_samples for index in flat)
    assert [len(batch) for batch in sampler] == [size] * len(sampler)
    assert len(sampler) == num_samples // size


def test_spectral_clustering_puts_each_planted_cluster_in_one_batch_and_random_does_not():
    embeddings, clusters = planted_two_clusters()
    beta = 10.0
    sampler = SpectralClusteringBatchSampler(32, 16, seed=0)
    random_partition = [set(batch) for batch in sampler.random_batches(0).tolist()]
    sampler.update(embeddings, inverse_temperature=beta, epoch=0)
    selected = [set(batch) for batch in sampler.batches().tolist()]
    assert sorted(selected, key=min) == clusters
    assert sorted(random_partition, key=min) != clusters

    # The hardest pairs (highest affinity = same cluster) are together, so the batches' loss is higher than random.
    affinity = contrastive_affinity(embeddings, beta)
    within_cluster = torch.tensor([[(i % 2) == (j % 2) and i != j for j in range(32)] for i in range(32)])
    assert affinity[within_cluster].min() > 100 * affinity[~within_cluster & ~torch.eye(32, dtype=torch.bool)].max()

    def mean_loss(batches: torch.Tensor) -> float:
        return sum(reference_loss(embeddings, batch, beta, True) for batch in batches) / len(batches)

    # Near-duplicates in every denominator: log 31 for SC's batches, about log 15 for a random half-and-half one.
    assert mean_loss(sampler.batches()) > mean_loss(sampler.random_batches(0)) + 0.5


@pytest.mark.parametrize("same_view_negatives", [True, False])
def test_affinity_is_the_pairwise_loss_terms(same_view_negatives: bool):
    embeddings, beta = random_embeddings(6, dim=4, seed=2), 3.0
    affinity = contrastive_affinity(embeddings, beta, same_view_negatives=same_view_negatives)
    u, v = F.normalize(embeddings[:, 0].double(), dim=-1), F.normalize(embeddings[:, 1].double(), dim=-1)
    for i in range(6):
        assert affinity[i, i] == 0
        for j in range(6):
            if i == j:
                continue
            expected = math.exp(beta * float(u[i] @ v[j])) + math.exp(beta * float(u[j] @ v[i]))
            if same_view_negatives:
                expected += math.exp(beta * float(u[i] @ u[j])) + math.exp(beta * float(v[i] @ v[j]))
            # stored scaled by e^{−β} (overflow guard; the normalised Laplacian ignores the scale)
            assert math.isclose(float(affinity[i, j]) * math.exp(beta), expected, rel_tol=1e-9)


@pytest.mark.parametrize("num_points", [24, 21])
def test_balanced_assignment_is_the_global_greedy_matching_with_capacity(num_points: int):
    num_centres, capacity = 4, 6
    distances = torch.rand(num_points, num_centres, generator=torch.Generator().manual_seed(num_points)).numpy()
    # Brute force: scan every (point, centre) pair from the closest up.
    pairs = sorted((distances[p, c], p, c) for p in range(num_points) for c in range(num_centres))
    expected, load = [-1] * num_points, [0] * num_centres
    for _, point, centre in pairs:
        if expected[point] < 0 and load[centre] < capacity:
            expected[point], load[centre] = centre, load[centre] + 1
    assignment = balanced_assignment(distances, capacity)
    assert assignment.tolist() == expected
    counts = torch.bincount(torch.from_numpy(assignment), minlength=num_centres)
    assert counts.max() <= capacity and counts.sum() == num_points
    if num_points == num_centres * capacity:
        assert (counts == capacity).all()


@pytest.mark.parametrize("same_view_negatives", [True, False])
def test_ordered_sgd_keeps_the_highest_loss_of_its_candidates(same_view_negatives: bool):
    num_samples, size, k, beta = 64, 8, 4, 5.0
    embeddings = random_embeddings(num_samples, dim=4, seed=4)
    sampler = OrderedSGDBatchSampler(
        num_samples, size, seed=7, num_candidates=k, same_view_negatives=same_view_negatives
    )
    sampler.update(embeddings, inverse_temperature=beta, epoch=2)
    batches = sampler.batches()
    assert batches.shape == (num_samples // size, size)
    all_candidates = sampler.candidate_batches(2)
    picked_other_than_first = 0
    for step in range(num_samples // size):
        candidates = sampler.candidate_batches(2, step)
        assert torch.equal(candidates, all_candidates[step])
        assert candidates.shape == (k, size)
        assert all(len(set(candidate.tolist())) == size for candidate in candidates)  # no repeat within a batch
        losses = torch.tensor([reference_loss(embeddings, c, beta, same_view_negatives) for c in candidates])
        best = int(losses.argmax())
        assert torch.equal(batches[step], candidates[best]), (step, losses)
        assert torch.allclose(sampler.candidate_losses[step], losses, atol=1e-4)
        picked_other_than_first += best != 0
    assert picked_other_than_first > 0  # the choice is not trivially the first candidate
    assert not torch.equal(sampler.candidate_batches(3), all_candidates)  # fresh candidates each epoch


@pytest.mark.parametrize("sampler_class", [OrderedSGDBatchSampler, SpectralClusteringBatchSampler])
def test_process_chunks_concatenate_to_the_global_batch(sampler_class: type[HighLossBatchSampler]):
    num_samples, size, num_processes = 70, 16, 4
    sampler = sampler_class(num_samples, size, num_processes=num_processes, seed=1)
    sampler.update(random_embeddings(num_samples), inverse_temperature=4.0, epoch=0)
    global_batches = sampler.batches().tolist()
    assert len(sampler) == len(global_batches) * num_processes == (num_samples // size) * num_processes
    chunks = list(sampler)
    assert len(chunks) == len(sampler)
    assert all(len(chunk) == size // num_processes == sampler.batch_size for chunk in chunks)
    regrouped = [sum(chunks[s * num_processes : (s + 1) * num_processes], []) for s in range(len(global_batches))]
    assert regrouped == global_batches
    # Accelerate hands list i to process i mod N: process r's step-s batch is chunk r of global batch s.
    shards = [list(BatchSamplerShard(sampler, num_processes, rank)) for rank in range(num_processes)]
    assert [sum((shard[s] for shard in shards), []) for s in range(len(global_batches))] == global_batches
    single = sampler_class(num_samples, size, seed=1)
    single.update(random_embeddings(num_samples), inverse_temperature=4.0, epoch=0)
    assert list(single) == global_batches and len(single) == len(global_batches)


@pytest.mark.parametrize("sampler_class", [OrderedSGDBatchSampler, SpectralClusteringBatchSampler])
def test_state_dict_round_trip_resumes_exactly(sampler_class: type[HighLossBatchSampler], tmp_path):
    num_samples, size = 50, 8
    sampler = sampler_class(num_samples, size, num_processes=2, seed=5)
    sampler.update(random_embeddings(num_samples, seed=9), inverse_temperature=6.0, epoch=1)
    save_file(sampler.state_dict(), str(tmp_path / "sampler.safetensors"))
    resumed = sampler_class(num_samples, size, num_processes=2, seed=5)
    resumed.load_state_dict(load_file(str(tmp_path / "sampler.safetensors")))
    assert resumed.epoch == 1
    assert list(resumed) == list(sampler)
    assert list(resumed) != list(sampler_class(num_samples, size, num_processes=2, seed=5))  # not the random default

    sampler.set_epoch(4)  # an epoch nobody embedded: its random partition, restored just as well
    resumed = sampler_class(num_samples, size, num_processes=2, seed=5)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.epoch == 4 and list(resumed) == list(sampler)

    with pytest.raises(ValueError, match="num_samples"):
        sampler_class(num_samples + 8, size, seed=5).load_state_dict(sampler.state_dict())


@pytest.mark.parametrize("sampler_class", [OrderedSGDBatchSampler, SpectralClusteringBatchSampler])
def test_same_seed_and_embeddings_give_the_same_batches_and_epochs_differ(sampler_class: type[HighLossBatchSampler]):
    num_samples, size = 48, 8
    embeddings = random_embeddings(num_samples, seed=11)
    first, second = sampler_class(num_samples, size, seed=2), sampler_class(num_samples, size, seed=2)
    assert list(first) == list(second)  # epoch 0 before any update: the same random partition on every process
    first.update(embeddings, 5.0, epoch=0)
    second.update(embeddings.clone(), 5.0, epoch=0)
    assert torch.equal(first.batches(), second.batches())
    assert not torch.equal(first.random_batches(0), first.random_batches(1))
    first.set_epoch(1)  # not embedded: falls back to epoch 1's random partition
    assert torch.equal(first.batches(), first.random_batches(1))
    assert not torch.equal(first.batches(1), second.batches(0))
    first.set_epoch(0)
    assert torch.equal(first.batches(), second.batches())


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="divisible by num_processes=4"):
        HighLossBatchSampler(100, 10, num_processes=4)
    with pytest.raises(ValueError, match="exceeds the 10 training examples"):
        OrderedSGDBatchSampler(10, 16)
    with pytest.raises(ValueError, match="at least 2"):
        OrderedSGDBatchSampler(10, 1)
    with pytest.raises(ValueError, match="ordered_sgd"):
        SpectralClusteringBatchSampler(SpectralClusteringBatchSampler.DEFAULT_MAX_SAMPLES + 1, 16)
    sampler = OrderedSGDBatchSampler(20, 4)
    for bad in (torch.randn(20, 3, 8), torch.randn(19, 2, 8), torch.randn(20, 8), torch.randn(20, 2, 0)):
        with pytest.raises(ValueError, match=r"shape \[num_samples=20, 2, d\]"):
            sampler.update(bad, 5.0, epoch=0)
    with pytest.raises(TypeError, match="floating-point"):
        sampler.update(torch.zeros(20, 2, 8, dtype=torch.long), 5.0, epoch=0)
    with pytest.raises(ValueError, match="inverse_temperature"):
        sampler.update(torch.randn(20, 2, 8), 0.0, epoch=0)
    with pytest.raises(ValueError, match="unknown batch selection 'hardest'"):
        build_batch_sampler("hardest", 20, 4)
    with pytest.raises(ValueError, match="does not take \\['max_samples'\\]"):
        build_batch_sampler("ordered_sgd", 20, 4, max_samples=100)
    with pytest.raises(ValueError, match="takes no options"):
        build_batch_sampler("random", 20, 4, num_candidates=2)


def test_registry_builds_each_selection():
    assert set(BATCH_SELECTIONS) == {"random", "spectral_clustering", "ordered_sgd"}
    assert build_batch_sampler("random", 20, 4) is None
    osgd = build_batch_sampler("ordered_sgd", 20, 4, num_processes=2, seed=3, num_candidates=6, max_samples=None)
    assert isinstance(osgd, OrderedSGDBatchSampler) and osgd.num_candidates == 6 and osgd.batch_size == 2
    sc = build_batch_sampler("spectral_clustering", 20, 4, same_view_negatives=False)
    assert isinstance(sc, SpectralClusteringBatchSampler) and not sc.same_view_negatives
