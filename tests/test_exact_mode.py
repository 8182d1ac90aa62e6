"""EMC² with re-encoded chain states against its definitions: eq. (5), eq. (11), the metrics, the trainer.

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from frozen_features import (  # noqa: E402
    FreshViews,
    expected_weights_fixed,
    expected_weights_fresh,
    iid_noise_floor,
    mean_total_variation,
    random_fixed_views,
)

from emc2_hf.objectives import EMC2Objective, SimCLRObjective, states_to_encode, two_view_problem  # noqa: E402
from emc2_hf.sampling import EMPTY_STATE, keyed_generator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- Frozen features: the expected negative weights against eq. (5) ----


def check_exact_and_biased(views, beta, batch_images, steps, order, biased=("dcl", "emc2_in_batch")):
    """The exact objective's TV to eq. (5) halves when the steps quadruple (noise); the batch-only ones stay put."""
    target = views.target(beta)
    late, early = expected_weights_fixed(views, "emc2", beta, batch_images, steps, order=order, snapshot_at=steps // 4)
    exact_late, exact_early = mean_total_variation(late, target), mean_total_variation(early, target)
    assert exact_late < 0.6 * exact_early, (exact_early, exact_late)  # ~1/√4 = 0.5: still falling
    num_images, num_views = views.num_images, views.num_views
    own_image = late.view(num_images, num_views, num_images, num_views).diagonal(dim1=0, dim2=2)
    assert torch.all(own_image == 0)  # never a view of the anchor's own image
    for name in biased:
        weights, early_weights = expected_weights_fixed(
            views, name, beta, batch_images, steps, order=order, snapshot_at=steps // 4
        )
        error, early_error = mean_total_variation(weights, target), mean_total_variation(early_weights, target)
        assert error > 0.8 * early_error and error > 1.6 * exact_late, (name, early_error, error, exact_late)
    return exact_early, exact_late


def test_expected_weights_converge_to_eq_5_over_every_view_of_every_other_image():
    # 16 images × 2 fixed views whose features differ (spread 1: the views of an image are as far apart as two
    # images), b = 4, β = 5, an epoch-wise shuffle. Eq. (5) for anchor view (i, a) is the softmax over the 30 views
    # (j, c), j ≠ i. Measured mean TV after 750 / 3,000 steps: exact EMC² (default conditional weights) 0.118 /
    # 0.060 (noise: halves with 4× the steps); decoupled InfoNCE 0.189 / 0.173 and the in-batch EMC² variant
    # 0.216 / 0.192 (bias: flat).
    _, exact_late = check_exact_and_biased(random_fixed_views(16, 2, 16, seed=0), 5.0, 4, 3000, "epochs")
    assert exact_late < 0.11


def test_expected_weights_converge_to_eq_5_with_three_fixed_views_and_pairs_drawn_per_epoch():
    # A = 3 fixed augmentations, a uniform pair of them per image and epoch (the collator's scheme), one chain per
    # augmentation: the negatives of (i, a) are all 3 views of every other image. Measured (12 images, b = 4, β = 5,
    # 1,000 / 4,000 steps): exact 0.181 / 0.091; decoupled InfoNCE 0.160 / 0.160; in-batch variant 0.196 / 0.180.
    check_exact_and_biased(random_fixed_views(12, 3, 16, seed=1), 5.0, 4, 4000, "epochs")


@pytest.mark.parametrize(
    ("options", "measured"),
    [
        ({"weighting": "samples"}, "0.169 / 0.085"),
        ({"weighting": "conditional", "chain_fraction": 0.5}, "0.174 / 0.089"),
    ],
)
def test_every_weighting_and_the_chain_fraction_keep_the_expectation(options, measured):
    # Same setting as above. The paper's visit frequencies ("samples"), and the conditional weights with only half the
    # chains running per epoch (the in-batch softmax as control variate): unbiased, the TV halves between 750 and
    # 3,000 steps (measured: {measured}; "recycled" 0.154 / 0.078, the default "conditional" 0.118 / 0.060).
    views = random_fixed_views(16, 2, 16, seed=0)
    target = views.target(5.0)
    late, early = expected_weights_fixed(views, "emc2", 5.0, 4, 3000, order="epochs", snapshot_at=750, **options)
    assert mean_total_variation(late, target) < 0.6 * mean_total_variation(early, target)


@pytest.mark.slow
def test_expected_weights_converge_to_eq_5_with_iid_batches_and_more_images():
    # 24 images × 2 views, b = 4, batches drawn i.i.d. instead of by epochs. Measured 0.155 / 0.081 (1,500 / 6,000
    # steps); decoupled InfoNCE 0.18 / 0.17, in-batch variant 0.21 / 0.20.
    check_exact_and_biased(random_fixed_views(24, 2, 16, seed=0), 5.0, 4, 6000, "iid")


@pytest.mark.slow
def test_with_a_high_inverse_temperature_the_exact_weights_reach_the_noise_floor():
    # b = 8, β = 14 (the paper's β for small batches): the batch softmax is far from eq. (5) (TV 0.42), the exact
    # objective falls 0.093 → 0.046 from 6,000 to 24,000 steps, toward the floor of i.i.d. draws from eq. (5).
    views = random_fixed_views(48, 2, 16, seed=0, spread=1.0)
    target = views.target(14.0)
    late, early = expected_weights_fixed(views, "emc2", 14.0, 8, 24000, order="epochs", snapshot_at=6000)
    assert mean_total_variation(late, target) < 0.6 * mean_total_variation(early, target)
    assert mean_total_variation(late, target) < 0.07
    biased, _ = expected_weights_fixed(views, "dcl", 14.0, 8, 6000, order="epochs")
    assert mean_total_variation(biased, target) > 0.35
    assert iid_noise_floor(target, 2000) < mean_total_variation(late, target)


@pytest.mark.slow
def test_with_fresh_views_the_chains_track_the_softmax_over_every_augmentation():
    # Fresh augmentations: each epoch shows new views of every image, so a chain starts from a sample for the
    # previous view of its image. Target: eq. (5) over every augmentation of every other image, as the image marginal
    # E_h[p_h(j)] averaged over the anchor's views h (Monte Carlo). Measured (16 images, view spread 0.5, b = 4,
    # β = 5, 8,000 → 32,000 steps): re-encoding the stored view 0.053 → 0.047 (a small floor: the views' targets
    # differ), re-encoding a fresh augmentation instead 0.057 → 0.053, decoupled InfoNCE 0.087 → 0.085, the in-batch
    # variant 0.091 → 0.090.
    centres = F.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    views = FreshViews(centres, 0.5)
    target = views.target(5.0, anchor_views=256, candidate_views=1024)
    stored, _ = expected_weights_fresh(views, "emc2", 5.0, 4, 16000)
    fresh, _ = expected_weights_fresh(views, "emc2", 5.0, 4, 16000, state_view="fresh")
    batch_only, _ = expected_weights_fresh(views, "dcl", 5.0, 4, 16000)
    stored_error, batch_error = mean_total_variation(stored, target), mean_total_variation(batch_only, target)
    assert stored_error < 0.65 * batch_error, (stored_error, batch_error)
    assert stored_error <= mean_total_variation(fresh, target) + 0.005


# ---- One step against eq. (11), the metrics and the state ----


def cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u / u.norm()) @ (v / v.norm())


def test_surrogate_gradient_is_eq_11_with_the_state_columns():
    beta, num_images = 3.0, 4
    objective = EMC2Objective(10, beta, num_proposals=8, burn_in=2, seed=5)
    batch = torch.arange(num_images)
    # View 1 of images 0 and 1 sits on states (7, view 0) and (8, view 1), outside the batch; view 1 of image 2 on
    # (1, view 1), in the batch; every other chain is empty.
    objective.chains.state_index[:4, 0] = torch.tensor([7, 8, 1, EMPTY_STATE])
    objective.chains.state_view[:4, 0] = torch.tensor([0, 1, 1, EMPTY_STATE])
    objective.chains.state_similarity[:4, 0] = torch.tensor([50.0, 50.0, 50.0, -math.inf])  # stale: never read
    keys = batch.repeat(2)
    slots = torch.arange(2).repeat_interleave(num_images)
    start_keys, start_views = objective.chain_starts(keys, slots)
    state_keys, state_views = states_to_encode(start_keys, start_views, keys, slots)
    assert list(zip(state_keys.tolist(), state_views.tolist(), strict=True)) == [(7, 0), (8, 1)]

    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2 * num_images, 5, generator=generator).requires_grad_(True)
    # The two states close to their anchors, so the chains often stay on them.
    extra = (embeddings[:2].detach() + 0.3 * torch.randn(2, 5, generator=generator)).requires_grad_(True)
    arguments = {
        "state_keys": state_keys,
        "state_views": state_views,
        "start_keys": start_keys,
        "start_views": start_views,
    }
    before = copy.deepcopy(objective)
    output = objective(embeddings, batch, step=3, state_embeddings=extra, **arguments)
    problem = two_view_problem(embeddings.detach(), batch, state_embeddings=extra.detach(), **arguments)
    weights, _ = before.negative_weights(problem, keyed_generator(5, "emc2", 3, 0))

    # Visit frequencies over negatives; state column 8 (state (7, 0)) only for view 1 of image 0, 9 for image 1's.
    assert torch.allclose(weights.sum(dim=1), torch.ones(8))
    same_image = torch.arange(8)[:, None] % num_images == torch.arange(8)[None, :] % num_images
    assert (weights[:, :8][same_image] == 0).all()
    owners = torch.zeros(8, 2, dtype=torch.bool)
    owners[0, 0] = owners[1, 1] = True
    assert (weights[:, 8:][~owners] == 0).all() and (weights[:, 8:][owners] > 0).any()
    # One view per negative image: an anchor never spreads weight over both views of one image in one step.
    per_view = weights[:, :8].view(8, 2, num_images)
    assert ((per_view > 0).sum(dim=1) <= 1).all()

    # Eq. (11) by hand: mean_a −β [∇s(a, p(a)) − Σ_c w_ac ∇s(a, c)], over views and state columns alike.
    candidates = torch.cat([embeddings, extra])
    by_hand = 0.0
    for anchor in range(8):
        by_hand = by_hand - beta * cosine(embeddings[anchor], embeddings[(anchor + num_images) % 8]) / 8
        for column in range(10):
            if weights[anchor, column] > 0:
                by_hand = by_hand + beta * weights[anchor, column] * cosine(embeddings[anchor], candidates[column]) / 8
    gradient = torch.autograd.grad(output.loss, (embeddings, extra))
    expected = torch.autograd.grad(by_hand, (embeddings, extra))
    for got, want in zip(gradient, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    assert gradient[1].abs().sum() > 0  # the re-encoded states receive gradient, like in-batch negatives


def test_recycled_and_conditional_weights_follow_their_definitions():
    from emc2_hf.objectives.emc2 import conditional_weights, rao_blackwellized_weights
    from emc2_hf.sampling import metropolis_hastings_sweep, one_candidate_per_example, uniform_proposals_from_lists

    generator = torch.Generator().manual_seed(4)
    embeddings = F.normalize(torch.randn(8, 5, generator=generator), dim=1)
    problem = two_view_problem(embeddings, torch.arange(4))
    log_scores = 3.0 * problem.similarities
    start = torch.tensor([1, 2, 3, 0, 5, 6, 7, 4])  # view 2 of the next image... every start a negative
    columns, counts = one_candidate_per_example(problem.negative_mask, problem.candidate_keys, start, generator)
    assert (counts == 3).all()  # one view of each of the 3 other images, the start among them
    assert all(int(start[a]) in columns[a, : counts[a]].tolist() for a in range(8))
    proposals = uniform_proposals_from_lists(columns, counts, 7, generator)
    sweep = metropolis_hastings_sweep(log_scores, proposals, start, log_scores.gather(1, start[:, None])[:, 0], 2)

    # Recycled: Σ_r [α_r δ(z'_r) + (1 − α_r) δ(z_r)] / (R − P) with α_r = min(1, exp(ℓ(z'_r) − ℓ(z_r))).
    by_hand = torch.zeros_like(log_scores)
    for a in range(8):
        state = int(sweep.previous_columns[a, 0])
        for r in range(5):
            proposal = int(proposals[a, 2 + r])
            alpha = min(1.0, math.exp(float(log_scores[a, proposal] - log_scores[a, state])))
            by_hand[a, proposal] += alpha / 5
            by_hand[a, state] += (1 - alpha) / 5
            state = int(sweep.samples[a, r])
    assert torch.allclose(rao_blackwellized_weights(sweep, log_scores, problem.negative_mask), by_hand, atol=1e-6)

    # Conditional: the softmax of β s over the sweep's candidate set.
    expected = torch.zeros_like(log_scores)
    for a in range(8):
        chosen = columns[a, : counts[a]]
        expected[a, chosen] = log_scores[a, chosen].softmax(dim=0)
    assert torch.allclose(conditional_weights(log_scores, [(columns, counts)]), expected, atol=1e-6)


def test_starts_are_scored_with_the_current_features_and_the_last_state_is_stored():
    beta = 4.0
    objective = EMC2Objective(10, beta, num_proposals=1, burn_in=0, seed=0)
    batch = torch.tensor([0, 1, 2, 3, 4])
    # View 1's chains: 0 → (5, 0) and 3 → (5, 0) (outside, shared), 1 → (2, 1) (in the batch), 2 empty, 4 → (9, 1).
    objective.chains.state_index[:5, 0] = torch.tensor([5, 2, EMPTY_STATE, 5, 9])
    objective.chains.state_view[:5, 0] = torch.tensor([0, 1, EMPTY_STATE, 0, 1])
    objective.chains.state_similarity[:5, 0] = 1e4  # stale and huge: never read by the exact objective
    keys, slots = batch.repeat(2), torch.arange(2).repeat_interleave(5)
    start_keys, start_views = objective.chain_starts(keys, slots)
    state_keys, state_views = states_to_encode(start_keys, start_views, keys, slots)
    assert state_keys.tolist() == [5, 9] and state_views.tolist() == [0, 1]
    embeddings = F.normalize(torch.randn(10, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    extra = F.normalize(torch.randn(2, 3, generator=torch.Generator().manual_seed(2)), dim=1)
    with torch.no_grad():
        output = objective(
            embeddings,
            batch,
            state_embeddings=extra,
            state_keys=state_keys,
            state_views=state_views,
            start_keys=start_keys,
            start_views=start_views,
        )
    assert output.metrics["reencoded_fraction"].item() == pytest.approx(0.3)  # 3 of the 10 anchors
    assert output.metrics["acceptance_rate"].item() > 0
    # Every chain now holds a negative view with its current similarity (≤ 1, not the stale 1e4).
    assert (objective.chains.state_index[:5] != EMPTY_STATE).all()
    assert (objective.chains.state_index[:5] != torch.arange(5)[:, None]).all()
    assert objective.chains.state_similarity[:5].max().item() <= 1.0 + 1e-5


def test_missing_state_columns_are_refused_and_other_objectives_ignore_chains():
    objective = EMC2Objective(10, 4.0)
    objective.chains.state_index[:2, 0] = torch.tensor([7, 8])
    objective.chains.state_view[:2, 0] = 0
    embeddings = torch.randn(4, 3)
    with pytest.raises(
        ValueError, match=r"\(dataset index, view\) \[\(7, 0\), \(8, 0\)\] are not columns.*states_to_encode"
    ):
        objective(embeddings, torch.arange(2))
    assert not SimCLRObjective.reencodes_chain_states and EMC2Objective.reencodes_chain_states
    assert objective.get_config_dict()["chains_per_example"] == 2


def test_a_repeated_image_in_the_gathered_batch_is_dropped_not_its_own_negative():
    # A padded distributed sampler can put one image on two processes at the end of an epoch: after the gather its
    # dataset index appears twice. The second copy is dropped (and counted); chains are written once.
    objective = EMC2Objective(10, 5.0, seed=0)
    indices = torch.tensor([0, 1, 0, 2])
    embeddings = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    output = objective(embeddings, indices)
    assert output.metrics["duplicate_images_dropped"].item() == 1.0
    problem = two_view_problem(embeddings, indices)
    assert problem.anchor_keys.tolist() == [0, 1, 2, 0, 1, 2]
    assert not (problem.negative_mask & (problem.anchor_keys[:, None] == problem.candidate_keys[None, :])).any()
    output.loss.backward()
    assert embeddings.grad[[2, 6]].abs().sum() == 0  # the dropped copy's views get no gradient
    assert (objective.chains.state_index[[0, 1, 2]] != torch.tensor([0, 1, 2])[:, None]).all()


# ---- The collator delivers the stored training views ----


def test_state_images_are_the_stored_training_views_fixed_and_fresh(digits):
    from emc2_hf import ContrastiveCollator, SimCLRAugmentation
    from emc2_hf.data import decode_image
    from emc2_hf.data.indexed import with_dataset_index
    from emc2_hf.sampling import ChainStateTable, MarkovChainState

    train = with_dataset_index(digits["train"].select(range(12)), "image", "dataset_index")
    for num_augmentations in (2, None):
        collator = ContrastiveCollator(
            augmentation=SimCLRAugmentation.from_preset("digits", image_size=16),
            seed=3,
            num_augmentations=num_augmentations,
        )
        chains = MarkovChainState(12, 2)
        # Image 0's view-1 chain sits on image 5 as it was shown in epoch 0 (view 2); image 1's on image 0 (view 1).
        collator.epoch = 0
        key_5, _ = collator.view_key_and_slot(5, 1)
        key_0, _ = collator.view_key_and_slot(0, 0)
        chains.state_index[[0, 1], 0] = torch.tensor([5, 0])
        chains.state_view[[0, 1], 0] = torch.tensor([key_5, key_0])
        table = ChainStateTable(chains)
        collator.attach_chain_states(table, train)
        epoch_0 = collator([train[5], train[6]])
        collator.epoch = 1
        batch = collator([train[0], train[1]])
        assert batch["start_index"][:2].tolist() == [5, 0] and batch["start_view"][:2].tolist() == [key_5, key_0]
        states = list(zip(batch["state_index"].tolist(), batch["state_view"].tolist(), strict=True))
        if num_augmentations is None:
            # Fresh views: epoch 1 shows new views of image 0, so its epoch-0 view 1 is encoded too.
            assert states == [(0, key_0), (5, key_5)]
            assert torch.equal(batch["state_pixel_values"][0], epoch_0_view(collator, train, 0))
        else:
            # Fixed views: (0, augmentation 0) is image 0's view 1 in every epoch, a column of this batch.
            assert states == [(5, key_5)] and batch["view_keys"][0].item() == key_0
        pixels_5 = batch["state_pixel_values"][-1]
        assert torch.equal(pixels_5, epoch_0["pixel_values"][2])  # exactly image 5's epoch-0 view 2
        image_5 = decode_image(train[5]["image"])
        assert torch.equal(pixels_5, collator.render(image_5, key_5))
        assert not torch.equal(pixels_5, collator.augmentation.eval_transform(image_5))


def test_with_a_chain_fraction_only_the_selected_chains_are_delivered_and_trained(tmp_path, digits):
    from emc2_hf import ContrastiveTrainer
    from emc2_hf.sampling import chain_selection

    trainer = ContrastiveTrainer(
        model=tiny_encoder(),
        args=trainer_arguments(tmp_path, max_steps=6, emc2_chain_fraction=0.5),
        train_dataset=digits["train"].select(range(24)),
        data_collator=digits_collator(),
    )
    collator = trainer.data_collator
    assert collator.chain_fraction == 0.5 and trainer.objective.chain_fraction == 0.5
    trainer.train()
    collator.epoch = 1
    batch = collator([trainer.train_dataset[i] for i in range(8)])
    keys = batch["dataset_index"].repeat(2)
    assert torch.equal(batch["chain_active"], chain_selection(0, 1, keys, batch["view_slots"], 0.5))
    assert 0 < int(batch["chain_active"].sum()) < 16
    starts = zip(
        batch["start_index"].tolist(), batch["start_view"].tolist(), batch["chain_active"].tolist(), strict=True
    )
    active, inactive = set(), set()
    for key, view, is_active in starts:
        (active if is_active else inactive).add((key, view))
    delivered = set(zip(batch["state_index"].tolist(), batch["state_view"].tolist(), strict=True))
    assert delivered <= active and not (delivered & (inactive - active))


def epoch_0_view(collator, train, index):
    """View 1 of ``train[index]`` as the collator showed it in epoch 0."""
    epoch, table = collator.epoch, collator.chain_states
    collator.epoch, collator.chain_states = 0, None
    try:
        return collator([train[index], train[(index + 1) % len(train)]])["pixel_values"][0]
    finally:
        collator.epoch, collator.chain_states = epoch, table


def test_workers_deliver_the_states_the_main_process_reads_across_the_epoch_boundary(tmp_path, digits):
    # 2 epochs of 3 steps with 1 and 2 DataLoader workers prefetching 2 batches each: every delivered start equals
    # the objective's own chain state at the step that uses it, so prefetched states are current, including the first
    # batches of epoch 2 (prefetched after epoch 1's last update), and the state images equal those of 0 workers
    # (the main process).
    from emc2_hf import ContrastiveTrainer

    records = {}

    class Recording(ContrastiveTrainer):
        def compute_loss(self, model, inputs, **kwargs):
            keys = inputs["dataset_index"].repeat(2)
            index, view = self.objective.chain_starts(keys, inputs["view_slots"])
            stale = int((index.cpu() != inputs["start_index"]).sum() + (view.cpu() != inputs["start_view"]).sum())
            records.setdefault(self.args.dataloader_num_workers, []).append(
                (stale, inputs["state_pixel_values"].clone(), int(inputs["state_index"].numel()))
            )
            return super().compute_loss(model, inputs, **kwargs)

    for workers in (0, 1, 2):
        torch.manual_seed(0)
        trainer = Recording(
            model=tiny_encoder(),
            args=trainer_arguments(tmp_path / str(workers), max_steps=6, dataloader_num_workers=workers),
            train_dataset=digits["train"].select(range(24)),
            data_collator=digits_collator(),
        )
        trainer.train()
    for workers in (1, 2):
        assert [stale for stale, _, _ in records[workers]] == [0] * 6
        assert sum(count for _, _, count in records[workers][3:]) > 0  # epoch 2 re-encodes states from epoch 1
        for (_, a, _), (_, b, _) in zip(records[0], records[workers], strict=True):
            assert torch.equal(a, b)


# ---- ContrastiveTrainer ----


def tiny_encoder():
    from emc2_hf import ContrastiveEncoder, ContrastiveEncoderConfig

    return ContrastiveEncoder(ContrastiveEncoderConfig(backbone="test_resnet", projection_dim=16))


def digits_collator(**overrides):
    from emc2_hf import ContrastiveCollator, SimCLRAugmentation

    return ContrastiveCollator(augmentation=SimCLRAugmentation.from_preset("digits", image_size=16), **overrides)


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
        "objective": "emc2",
    }
    values.update(overrides)
    return ContrastiveTrainingArguments(**values)


@pytest.mark.parametrize("num_augmentations", [None, 2])
def test_emc2_trains_logs_and_resumes_bit_for_bit(tmp_path, digits, num_augmentations):
    from emc2_hf import ContrastiveTrainer

    train = digits["train"].select(range(24))  # 3 steps per epoch at b = 8: states leave the batch from step 3 on

    def run(output_dir, resume=None, **overrides):
        torch.manual_seed(0)
        trainer = ContrastiveTrainer(
            model=tiny_encoder(),
            args=trainer_arguments(output_dir, **overrides),
            train_dataset=train,
            data_collator=digits_collator(num_augmentations=num_augmentations),
        )
        result = trainer.train(resume_from_checkpoint=resume)
        return trainer, result

    uninterrupted, result = run(tmp_path / "a", save_strategy="steps", save_steps=4)
    assert math.isfinite(result.training_loss)
    logs = [log for log in uninterrupted.state.log_history if "loss" in log]
    assert len(logs) == 5 and all(math.isfinite(log["loss"]) for log in logs)
    assert max(log["reencoded_fraction"] for log in logs) > 0  # epoch 1 starts on states from epoch 0
    assert all("outside_batch_sample_fraction" not in log for log in logs)
    # Resumed from step 4 (the re-encoding already under way), the run continues bit for bit.
    resumed, _ = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"))
    for (name, a), b in zip(
        uninterrupted.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    for name, value in uninterrupted.objective.state_dict().items():
        assert torch.equal(value, resumed.objective.state_dict()[name]), name
    assert torch.equal(resumed.chain_table.state_index, resumed.objective.chains.state_index)


# ---- Two processes: N × b/N images with delivered states == 1 × b images by definition ----


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

    from emc2_hf import ContrastiveTrainer, load_digits_dataset

    torch.manual_seed(0)
    model = LinearEncoder(16)
    reference_model = copy.deepcopy(model)
    collator = digits_collator(seed=0)
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
    reference = EMC2Objective(20, args.inverse_temperature, seed=1)
    generator = torch.Generator().manual_seed(0)
    # Chains already on views of other images (keys of epoch 0), with stale scores.
    offsets = torch.randint(1, 20, (20, 2), generator=generator)
    index = (torch.arange(20)[:, None] + offsets) % 20
    view = torch.tensor([[collator.view_key_and_slot(int(j), v)[0] for v, j in enumerate(row)] for row in index])
    initial = {"state_index": index, "state_view": view, "state_similarity": torch.randn(20, 2, generator=generator)}
    collator.epoch = 1  # a new epoch: new views, so every state is re-encoded from its stored epoch-0 view
    for objective in (trainer.objective, reference):
        objective.chains.load_state_dict(initial)
    trainer.chain_table.refresh(trainer.objective.chains)
    checks = []
    for step in range(3):
        trainer.state.global_step = step
        indices = torch.randperm(20, generator=generator)[: 4 * size]
        rows = [trainer.train_dataset[i] for i in indices.tolist()]
        num = 4 * size
        local = slice(rank * 4, (rank + 1) * 4)
        inputs = collator(rows[local])  # what this process's DataLoader would deliver
        whole = collator(rows)  # one process with the global batch, collated before the step updates the table
        loss = trainer.compute_loss(model, inputs)
        model.zero_grad()
        loss.backward()
        for parameter in model.parameters():  # what DDP does
            dist.all_reduce(parameter.grad)
            parameter.grad /= size

        views = whole["pixel_values"]
        embeddings = reference_model(pixel_values=torch.cat([views, whole["state_pixel_values"]])).embeddings
        reference_loss = reference(
            embeddings[: 2 * num],
            indices,
            step=step,
            view_keys=whole["view_keys"],
            view_slots=whole["view_slots"],
            state_embeddings=embeddings[2 * num :],
            state_keys=whole["state_index"],
            state_views=whole["state_view"],
            start_keys=whole["start_index"],
            start_views=whole["start_view"],
        ).loss
        reference_model.zero_grad()
        reference_loss.backward()
        checks.append(
            {
                "num_states": int(whole["state_index"].numel()),
                "loss_equal": abs(loss.item() - reference_loss.item()) < 1e-6,
                "grad_close": all(
                    torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-5)  # float sums in another order
                    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True)
                ),
                "index_equal": torch.equal(trainer.objective.chains.state_index, reference.chains.state_index),
                "view_equal": torch.equal(trainer.objective.chains.state_view, reference.chains.state_view),
                "table_equal": torch.equal(trainer.chain_table.state_index, reference.chains.state_index),
            }
        )
        with torch.no_grad():
            for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
                p -= 0.5 * p.grad
                q -= 0.5 * q.grad
    with open(os.path.join(output_dir, f"exact-rank{rank}.json"), "w") as handle:
        json.dump(checks, handle)


@pytest.mark.slow
def test_two_processes_encode_their_delivered_states_and_match_one_process(tmp_path):
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
    from worker_exit import finish

    finish()
