"""Objectives on image–text pairs against their definitions: CLIP's loss, eq. (5) per direction, per-direction
state."""

import math

import pytest
import torch
import torch.nn.functional as F
from frozen_features import mean_total_variation
from transformers.models.clip import modeling_clip

from emc2_hf.objectives import (
    ImageTextProblems,
    SymmetricObjective,
    build_image_text_objective,
    cross_modal_problem,
    image_text_problems,
    states_to_encode,
)
from emc2_hf.sampling import keyed_generator, keyed_seed

# CLIPModel.forward(return_loss=True)'s loss on logits_per_text (transformers 4: clip_loss; 5: renamed).
clip_loss = getattr(modeling_clip, "clip_loss", None) or modeling_clip.image_text_contrastive_loss


def _pairs(num_pairs: int = 6, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_pairs, dim, generator=generator, dtype=torch.float64).float().requires_grad_()
    texts = torch.randn(num_pairs, dim, generator=generator, dtype=torch.float64).float().requires_grad_()
    return images, texts


def test_symmetric_infonce_is_transformers_clip_loss_in_value_and_gradient_with_a_learned_scale():
    images, texts = _pairs()
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    objective = build_image_text_objective("simclr", num_samples=6, inverse_temperature=1.0)
    problems = image_text_problems(images, texts, torch.arange(6), inverse_temperature=logit_scale.exp())
    ours = objective(problems).loss
    ours.backward()
    ours_gradients = [images.grad.clone(), texts.grad.clone(), logit_scale.grad.clone()]
    for tensor in (images, texts, logit_scale):
        tensor.grad = None

    # transformers' CLIPModel.forward: normalise, logits_per_text = scale · t · iᵀ, loss = clip_loss(logits_per_text).
    logits_per_text = logit_scale.exp() * F.normalize(texts, dim=-1) @ F.normalize(images, dim=-1).t()
    reference = clip_loss(logits_per_text)
    reference.backward()
    assert torch.allclose(ours, reference, atol=1e-6)
    for mine, theirs in zip(ours_gradients, [images.grad, texts.grad, logit_scale.grad], strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6), (mine, theirs)


def test_a_fixed_scale_is_the_objectives_inverse_temperature():
    images, texts = _pairs()
    fixed = build_image_text_objective("simclr", 6, inverse_temperature=14.28)
    given = build_image_text_objective("simclr", 6, inverse_temperature=1.0)
    problems = image_text_problems(images, texts, torch.arange(6))
    scaled = image_text_problems(images, texts, torch.arange(6), inverse_temperature=14.28)
    assert torch.allclose(fixed(problems).loss, given(scaled).loss)


def test_each_direction_takes_the_pairs_texts_or_images_as_candidates_and_the_pair_as_positive():
    images, texts = _pairs(num_pairs=4)
    problems = image_text_problems(images, texts, torch.tensor([7, 3, 9, 1]), caption_index=torch.tensor([0, 2, 1, 0]))
    assert isinstance(problems, ImageTextProblems)
    image_to_text, text_to_image = problems
    cosine = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).t()
    assert torch.allclose(image_to_text.similarities, cosine)
    assert torch.allclose(text_to_image.similarities, cosine.t())
    for problem in problems:
        assert problem.positive_columns.tolist() == [0, 1, 2, 3]
        assert torch.equal(problem.negative_mask, ~torch.eye(4, dtype=torch.bool))
        assert torch.equal(problem.info_nce_mask, torch.ones(4, 4, dtype=torch.bool))  # CLIP: the whole row
    assert image_to_text.candidate_views.tolist() == [0, 2, 1, 0]  # a text is (pair, caption)
    assert text_to_image.anchor_slots.tolist() == [0, 2, 1, 0]  # each caption keeps its own chain
    assert image_to_text.anchor_slots.tolist() == [0, 0, 0, 0]


def test_a_repeated_pair_is_dropped_and_bad_shapes_are_refused():
    images, texts = _pairs(num_pairs=4)
    problem = cross_modal_problem(images, texts, torch.tensor([5, 6, 5, 8]))
    assert problem.num_duplicates_dropped == 1 and problem.anchor_keys.tolist() == [5, 6, 8]
    with pytest.raises(ValueError, match="one anchor and one candidate per pair"):
        cross_modal_problem(images, texts[:3], torch.arange(4))
    with pytest.raises(ValueError, match="same width"):
        cross_modal_problem(images, texts[:, :4], torch.arange(4))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        cross_modal_problem(images[:2], texts[:2], torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="ImageTextProblems"):
        build_image_text_objective("simclr", 4, 5.0)(problem)


def test_each_direction_keeps_its_own_state_keyed_by_dataset_index():
    images, texts = _pairs(num_pairs=4)
    sogclr = build_image_text_objective("sogclr", num_samples=10, inverse_temperature=5.0)
    sogclr(image_text_problems(images, texts, torch.tensor([1, 4, 6, 9])))
    names = sorted(name for name, _ in sogclr.named_buffers())
    assert names == [
        "image_to_text.moving_average.initialised",
        "image_to_text.moving_average.log_u",
        "text_to_image.moving_average.initialised",
        "text_to_image.moving_average.log_u",
    ]
    cosine = F.normalize(images.detach(), dim=-1) @ F.normalize(texts.detach(), dim=-1).t()
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    for direction, similarities in (("image_to_text", cosine), ("text_to_image", cosine.t())):
        state = sogclr.directions[direction].moving_average
        # First visit: u_i is the batch mean of exp(β s) over the pair's 3 negatives in this direction.
        expected = torch.logsumexp((5.0 * similarities).masked_fill(~off_diagonal, -math.inf), dim=1) - math.log(3)
        assert torch.allclose(state.log_u[[1, 4, 6, 9]], expected, atol=1e-6)
        assert state.initialised.sum() == 4
    emc2 = build_image_text_objective("emc2", num_samples=10, inverse_temperature=5.0, captions_per_pair=5)
    assert emc2.image_to_text.chains.num_slots == 1 and emc2.text_to_image.chains.num_slots == 5
    assert emc2.reencodes_chain_states and emc2.name == "emc2" and "both directions" in emc2.title


def test_the_two_directions_draw_independent_random_numbers():
    objective = build_image_text_objective("emc2", 10, 5.0, weighting="samples")
    first, second = objective.image_to_text, objective.text_to_image
    assert (first.stream, second.stream) == ("image_to_text", "text_to_image")
    with pytest.raises(ValueError, match="one objective"):
        SymmetricObjective(first, build_image_text_objective("simclr", 10, 5.0).text_to_image)


# ---- EMC² on pairs with frozen features: the expected weights of each direction reach eq. (5) ----


def _caption_of(seed: int, epoch: int, index: int, num_captions: int) -> int:
    return keyed_seed(seed, "caption", epoch, index) % num_captions


def _expected_image_text_weights(images, texts, beta: float, batch_pairs: int, steps: int, seed: int = 0):
    """Average weights of EMC² per anchor over an epoch-wise shuffle, captions drawn uniformly per epoch.

    ``images [m, d]`` (one fixed view each), ``texts [m, C, d]`` (``C`` captions per pair). Returns
    ``(image→text [m, m·C], text→image [m·C, m])`` with the caller re-encoding chain states as the trainer does."""
    m, num_captions = texts.shape[:2]
    objective = build_image_text_objective("emc2", m, beta, seed=seed, captions_per_pair=num_captions)
    image_totals = torch.zeros(m, m * num_captions, dtype=torch.float64)
    text_totals = torch.zeros(m * num_captions, m, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = m // batch_pairs
    for step in range(steps):
        epoch, position = divmod(step, per_epoch)
        if position == 0:
            order = torch.randperm(m, generator=generator)
        batch = order[position * batch_pairs : (position + 1) * batch_pairs]
        captions = torch.tensor([_caption_of(seed, epoch, int(i), num_captions) for i in batch])
        zeros = torch.zeros_like(batch)
        text_start = objective.image_to_text.chain_starts(batch, zeros)
        text_keys, text_views = states_to_encode(*text_start, batch, captions)
        image_start = objective.text_to_image.chain_starts(batch, captions)
        image_keys, image_views = states_to_encode(*image_start, batch, zeros)
        problems = image_text_problems(
            images[batch],
            texts[batch, captions],
            batch,
            image_view_keys=zeros,
            caption_index=captions,
            text_states=(texts[text_keys, text_views], text_keys, text_views),
            text_starts=text_start,
            image_states=(images[image_keys], image_keys, image_views),
            image_starts=image_start,
        )
        with torch.no_grad():
            for direction, problem, totals in (
                ("image_to_text", problems.image_to_text, image_totals),
                ("text_to_image", problems.text_to_image, text_totals),
            ):
                weights, _ = objective.directions[direction].negative_weights(
                    problem, keyed_generator(seed, direction, step)
                )
                if direction == "image_to_text":
                    rows = problem.anchor_keys
                    columns = problem.candidate_keys * num_captions + problem.candidate_views
                else:
                    rows = problem.anchor_keys * num_captions + problem.anchor_slots
                    columns = problem.candidate_keys
                totals.index_put_(
                    (rows[:, None].expand_as(weights), columns[None, :].expand_as(weights)),
                    weights.double(),
                    accumulate=True,
                )
    return [totals / totals.sum(dim=1, keepdim=True).clamp(min=1e-300) for totals in (image_totals, text_totals)]


def _image_text_targets(images, texts, beta: float):
    """Eq. (5) per direction: an image over every caption of every other pair, a caption over every other image."""
    m, num_captions = texts.shape[:2]
    flat_texts = texts.reshape(m * num_captions, -1)
    owner = torch.arange(m * num_captions) // num_captions
    image_logits = (beta * images @ flat_texts.t()).masked_fill(torch.arange(m)[:, None] == owner[None, :], -math.inf)
    text_logits = (beta * flat_texts @ images.t()).masked_fill(owner[:, None] == torch.arange(m)[None, :], -math.inf)
    return image_logits.double().softmax(dim=1), text_logits.double().softmax(dim=1)


def test_emc2_on_pairs_tracks_eq_5_in_both_directions_and_its_error_is_noise():
    """12 pairs × 3 distinct captions, b = 4, β = 5, epoch-wise batches: the TV of each direction's averaged weights
    to eq. (5) halves with 4× the steps (noise, not bias)."""
    generator = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(12, 8, generator=generator), dim=-1)
    texts = F.normalize(images[:, None] + 1.5 * torch.randn(12, 3, 8, generator=generator), dim=-1)
    targets = _image_text_targets(images, texts, 5.0)
    short = _expected_image_text_weights(images, texts, 5.0, batch_pairs=4, steps=300)
    long = _expected_image_text_weights(images, texts, 5.0, batch_pairs=4, steps=1200)
    for direction, target, early, late in zip(("image→text", "text→image"), targets, short, long, strict=True):
        tv_short, tv_long = mean_total_variation(early, target), mean_total_variation(late, target)
        assert tv_long < 0.65 * tv_short, (direction, tv_short, tv_long)
        assert tv_long < 0.12, (direction, tv_long)


def test_chains_weigh_with_the_problems_current_scale_not_the_objectives():
    """EMC² built with β = 1 on problems whose (learned) scale is 20, then 3: each pair shows one caption, so every
    sweep's candidate set is the anchor's in-batch negatives (the chain's start among them) and the conditional
    weights are the softmax of the *current* β s over them — β = 1 would give other weights."""
    images, texts = _pairs(num_pairs=5)
    objective = build_image_text_objective("emc2", num_samples=5, inverse_temperature=1.0)
    for step, beta in enumerate((20.0, 3.0)):  # step 2 starts from the chains step 1 stored
        scale = torch.tensor(beta, requires_grad=True)
        problems = image_text_problems(images, texts, torch.arange(5), inverse_temperature=scale)
        for direction, problem in zip(("image_to_text", "text_to_image"), problems, strict=True):
            weights, _ = objective.directions[direction].negative_weights(problem, keyed_generator(step, direction))
            logits = beta * problem.similarities.detach()
            torch.testing.assert_close(weights, logits.masked_fill(~problem.negative_mask, -math.inf).softmax(1))
        chains = objective.image_to_text.chains
        assert (chains.state_index[:, 0] >= 0).all()  # every chain moved onto a negative
        stored = chains.state_similarity[:, 0]
        cosine = problems.image_to_text.similarities.detach()
        assert torch.allclose(stored, cosine[torch.arange(5), chains.state_index[:, 0]])  # s, not β·s


def test_the_symmetric_surrogate_gradient_is_eq_11_of_each_direction_by_hand():
    """∇ of the objective = ½ Σ_directions mean_a [−β ∇s(a, p(a)) + β Σ_c w_ac ∇s(a, c)] with the weights EMC² draws
    (visit frequencies, chain states outside the batch re-encoded as state columns), for the features, the state
    features and a learned β."""
    import copy

    generator = torch.Generator().manual_seed(5)
    features = torch.randn(10, 2, 8, generator=generator)  # 10 pairs: [image, text] features
    objective = build_image_text_objective("emc2", num_samples=10, inverse_temperature=1.0, weighting="samples")
    batch = torch.tensor([0, 3, 5, 7])
    outside = {0: (1, 2), 3: (4, 6), 5: (6, 8), 7: (8, 9)}  # each anchor's text state and image state, not in batch
    for index, (text_state, image_state) in outside.items():
        objective.image_to_text.chains.state_index[index, 0] = text_state
        objective.text_to_image.chains.state_index[index, 0] = image_state
        objective.image_to_text.chains.state_view[index, 0] = objective.text_to_image.chains.state_view[index, 0] = 0
    zeros = torch.zeros_like(batch)
    text_start = objective.image_to_text.chain_starts(batch, zeros)
    text_keys, text_views = states_to_encode(*text_start, batch, zeros)
    image_start = objective.text_to_image.chain_starts(batch, zeros)
    image_keys, image_views = states_to_encode(*image_start, batch, zeros)
    leaves = [
        features[batch, 0].clone().requires_grad_(),  # images
        features[batch, 1].clone().requires_grad_(),  # texts
        features[text_keys, 1].clone().requires_grad_(),  # re-encoded caption states
        features[image_keys, 0].clone().requires_grad_(),  # re-encoded image states
        torch.tensor(4.0, requires_grad=True),  # β
    ]

    def problems():
        images, texts, state_texts, state_images, scale = leaves
        return image_text_problems(
            images,
            texts,
            batch,
            text_states=(state_texts, text_keys, text_views),
            text_starts=text_start,
            image_states=(state_images, image_keys, image_views),
            image_starts=image_start,
            inverse_temperature=scale,
        )

    assert problems().image_to_text.similarities.shape == (4, 8)  # 4 texts + 4 state columns
    reference = copy.deepcopy(objective)  # the same chains: its draws are the objective's (same random keys)
    weights = [
        reference.directions[direction].negative_weights(problem, keyed_generator(0, "emc2", direction, 0, 0))[0]
        for direction, problem in zip(("image_to_text", "text_to_image"), problems(), strict=True)
    ]
    assert all((w[:, 4:] > 0).any() for w in weights)  # the state columns carry weight
    gradients = torch.autograd.grad(objective(problems(), step=0).loss, leaves)
    scale = leaves[-1]
    by_hand = 0.5 * sum(
        (scale * ((w * p.similarities).sum(1) - p.similarities.diagonal())).mean()
        for w, p in zip(weights, problems(), strict=True)
    )
    for mine, theirs in zip(gradients, torch.autograd.grad(by_hand, leaves), strict=True):
        torch.testing.assert_close(mine, theirs)
