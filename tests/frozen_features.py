"""Frozen-feature simulations of the objectives' expected negative weights, against eq. (5).

Shared by ``tests/test_exact_mode.py`` and ``benchmarks/estimator_bias.py``. Features are fixed tensors (a frozen
encoder), every view of every image has its own feature, and batches are drawn i.i.d. or by an epoch-wise shuffle.
The objectives run exactly as in training: the caller (here) re-encodes the chain states the batch does not hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from emc2_hf.objectives import build_objective, states_to_encode, two_view_problem
from emc2_hf.sampling import chain_selection, keyed_generator, keyed_seed


@dataclass
class FixedViews:
    """``m`` images × ``A`` fixed views with features ``[m, A, d]`` (L2-normalised)."""

    features: torch.Tensor

    @property
    def num_images(self) -> int:
        return self.features.shape[0]

    @property
    def num_views(self) -> int:
        return self.features.shape[1]

    def target(self, beta: float) -> torch.Tensor:
        """Eq. (5) for every anchor view: ``[m·A, m·A]``, row ``(i, a)`` over candidates ``(j, c)``, ``j ≠ i``."""
        flat = self.features.reshape(-1, self.features.shape[-1])
        image = torch.arange(flat.shape[0]) // self.num_views
        logits = (beta * flat @ flat.t()).masked_fill(image[:, None] == image[None, :], float("-inf"))
        return logits.softmax(dim=1)


def random_fixed_views(num_images: int, num_views: int, dim: int, seed: int, spread: float = 1.0) -> FixedViews:
    """Views ``normalize(μ_i + spread · ε_ia)``: ``spread`` large makes the views of an image unrelated."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_images, 1, dim, generator=generator)
    noise = torch.randn(num_images, num_views, dim, generator=generator)
    return FixedViews(F.normalize(centres + spread * noise, dim=-1))


def batch_stream(num_images: int, batch_images: int, steps: int, order: str, seed: int):
    """Yield ``(epoch, batch)``: i.i.d. uniform batches, or an epoch-wise shuffle without replacement (drop last)."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num_images // batch_images
    for step in range(steps):
        if order == "iid":
            yield step, torch.randperm(num_images, generator=generator)[:batch_images]
        else:
            if step % per_epoch == 0:
                permutation = torch.randperm(num_images, generator=generator)
            position = step % per_epoch
            yield step // per_epoch, permutation[position * batch_images : (position + 1) * batch_images]


def fixed_view_pairs(num_views: int, epoch: int, batch: torch.Tensor, seed: int) -> torch.Tensor:
    """``[b, 2]``: which two of an image's ``A`` fixed views a batch shows (a uniform pair per image and epoch)."""
    if num_views == 2:
        return torch.tensor([0, 1]).repeat(batch.numel(), 1)
    pairs = [
        torch.randperm(num_views, generator=keyed_generator(seed, "pair", epoch, int(index)))[:2] for index in batch
    ]
    return torch.stack(pairs)


def expected_weights_fixed(
    views: FixedViews,
    objective_name: str,
    beta: float,
    batch_images: int,
    steps: int,
    order: str = "iid",
    seed: int = 0,
    snapshot_at: int | None = None,
    **objective_options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Average negative weights per anchor view over ``steps`` batches: ``[m·A, m·A]``, and the same after
    ``snapshot_at`` steps. Weight on the anchor's own image (SimCLR's positive) is dropped and rows are normalised,
    so every objective's negative distribution compares with eq. (5)."""
    m, num_views = views.num_images, views.num_views
    options = dict(objective_options)
    if objective_name.startswith("emc2"):
        options.setdefault("num_slots", num_views)
    objective = build_objective(objective_name, m, beta, seed=seed, **options)
    totals = torch.zeros(m * num_views, m * num_views, dtype=torch.float64)
    snapshot = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up would dominate
    try:
        for step, (epoch, batch) in enumerate(batch_stream(m, batch_images, steps, order, seed)):
            if snapshot_at is not None and step == snapshot_at:
                snapshot = _normalised(totals.masked_fill(_own_image_mask(m, num_views), 0.0))
            pairs = fixed_view_pairs(num_views, epoch, batch, seed)
            view_index = torch.cat([pairs[:, 0], pairs[:, 1]])  # [2b]: the augmentation each view shows
            keys = batch.repeat(2)
            embeddings = views.features[keys, view_index]
            arguments = {"view_keys": view_index, "view_slots": view_index}
            if objective.reencodes_chain_states:
                chained = chain_selection(seed, epoch, keys, view_index, objective.chain_fraction)
                start_keys, start_views = objective.chain_starts(keys, view_index)
                state_keys, state_views = states_to_encode(start_keys, start_views, keys, view_index, chained)
                arguments.update(
                    state_embeddings=views.features[state_keys, state_views],
                    state_keys=state_keys,
                    state_views=state_views,
                    start_keys=start_keys,
                    start_views=start_views,
                    chain_anchors=chained,
                )
            problem = two_view_problem(embeddings, batch, **arguments)
            with torch.no_grad():
                weights, _ = objective.negative_weights(problem, keyed_generator(seed, objective_name, step))
            rows = problem.anchor_keys * num_views + problem.anchor_slots
            columns = problem.candidate_keys * num_views + problem.candidate_views
            totals.index_put_(
                (rows[:, None].expand_as(weights), columns[None, :].expand_as(weights)),
                weights.double(),
                accumulate=True,
            )
    finally:
        torch.set_num_threads(threads)
    own = _own_image_mask(m, num_views)
    return _normalised(totals.masked_fill(own, 0.0)), None if snapshot is None else snapshot.masked_fill(own, 0.0)


def _own_image_mask(num_images: int, num_views: int) -> torch.Tensor:
    """``[m·A, m·A]``: the columns of the anchor's own image (SimCLR's positive sits there; eq. (5) has none)."""
    image = torch.arange(num_images * num_views) // num_views
    return image[:, None] == image[None, :]


def _normalised(totals: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum to 1 (rows without weight stay 0)."""
    sums = totals.sum(dim=1, keepdim=True)
    return torch.where(sums > 0, totals / sums.clamp(min=1e-300), totals)


def mean_total_variation(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the visited anchor rows of ``½ Σ |estimate − target|``."""
    visited = estimate.sum(dim=1) > 0
    return float(0.5 * (estimate[visited] - target[visited]).abs().sum(dim=1).mean())


def iid_noise_floor(target: torch.Tensor, draws: int, seed: int = 0) -> float:
    """TV of the empirical distribution of ``draws`` i.i.d. samples from each row of ``target`` (noise only)."""
    generator = torch.Generator().manual_seed(seed)
    samples = torch.multinomial(target.float(), draws, replacement=True, generator=generator)
    empirical = torch.zeros_like(target).scatter_add_(1, samples, torch.ones_like(samples, dtype=target.dtype))
    return mean_total_variation(empirical / draws, target)


# ---- Fresh augmentations: every epoch shows new views of every image ----


@dataclass
class FreshViews:
    """Image ``j``'s view with key ``k`` has feature ``normalize(μ_j + spread · ε(k))``."""

    centres: torch.Tensor
    spread: float
    seed: int = 0

    def feature(self, keys: torch.Tensor, view_keys: torch.Tensor) -> torch.Tensor:
        if not keys.numel():
            return self.centres.new_zeros(0, self.centres.shape[1])
        noise = torch.stack(
            [
                torch.randn(self.centres.shape[1], generator=torch.Generator().manual_seed(int(key) % (2**62)))
                for key in view_keys.tolist()
            ]
        )
        return F.normalize(self.centres[keys] + self.spread * noise, dim=-1)

    def view_key(self, epoch: int, index: int, view: int) -> int:
        return keyed_seed(self.seed, "augmentation", epoch, index, view)

    def target(self, beta: float, anchor_views: int = 64, candidate_views: int = 256) -> torch.Tensor:
        """``[m, m]``: ``E_h[p_h(j)]``, the image marginal of eq. (5) over every augmentation of every other image,
        averaged over the anchor's views ``h`` (Monte Carlo)."""
        m, dim = self.centres.shape
        generator = torch.Generator().manual_seed(12345)
        anchors = F.normalize(
            self.centres[:, None] + self.spread * torch.randn(m, anchor_views, dim, generator=generator), dim=-1
        )
        candidates = F.normalize(
            self.centres[:, None] + self.spread * torch.randn(m, candidate_views, dim, generator=generator), dim=-1
        )
        # log E_g exp(β h·g_j) for every anchor view h of every image and every candidate image j.
        logits = beta * torch.einsum("ihd,jgd->ihjg", anchors, candidates)
        log_mean = torch.logsumexp(logits, dim=-1) - math.log(candidate_views)  # [m, H, m]
        eye = torch.eye(m, dtype=torch.bool)[:, None, :].expand_as(log_mean)
        p = log_mean.masked_fill(eye, float("-inf")).softmax(dim=-1)
        return p.mean(dim=1).double()


def expected_weights_fresh(
    views: FreshViews,
    objective_name: str,
    beta: float,
    batch_images: int,
    steps: int,
    order: str = "epochs",
    seed: int = 0,
    state_view: str = "stored",
    snapshot_at: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Average negative weights per anchor *image* over candidate images: ``[m, m]``.

    ``state_view``: ``"stored"`` re-encodes the state's own view (the view key the chain stored); ``"fresh"``
    re-encodes a fresh augmentation keyed by (step, index) instead.
    """
    m = views.centres.shape[0]
    objective = build_objective(objective_name, m, beta, seed=seed)
    totals = torch.zeros(m, m, dtype=torch.float64)
    snapshot = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step, (epoch, batch) in enumerate(batch_stream(m, batch_images, steps, order, seed)):
            if snapshot_at is not None and step == snapshot_at:
                snapshot = _normalised(totals.masked_fill(torch.eye(m, dtype=torch.bool), 0.0))
            keys = batch.repeat(2)
            slots = torch.arange(2).repeat_interleave(batch.numel())
            view_keys = torch.tensor([views.view_key(epoch, int(k), int(v)) for k, v in zip(keys, slots, strict=True)])
            embeddings = views.feature(keys, view_keys)
            arguments = {"view_keys": view_keys, "view_slots": slots}
            if objective.reencodes_chain_states:
                start_keys, start_views = objective.chain_starts(keys, slots)
                if state_view == "fresh":
                    fresh = torch.tensor([keyed_seed(seed, "state", step, int(k)) for k in start_keys.tolist()])
                    start_views = torch.where(start_keys >= 0, fresh, start_views)
                state_keys, state_views = states_to_encode(start_keys, start_views, keys, view_keys)
                arguments.update(
                    state_embeddings=views.feature(state_keys, state_views),
                    state_keys=state_keys,
                    state_views=state_views,
                    start_keys=start_keys,
                    start_views=start_views,
                )
            problem = two_view_problem(embeddings, batch, **arguments)
            with torch.no_grad():
                weights, _ = objective.negative_weights(problem, keyed_generator(seed, objective_name, step))
            rows = problem.anchor_keys[:, None].expand_as(weights)
            columns = problem.candidate_keys[None, :].expand_as(weights)
            totals.index_put_((rows, columns), weights.double(), accumulate=True)
    finally:
        torch.set_num_threads(threads)
    own = torch.eye(m, dtype=torch.bool)
    return _normalised(totals.masked_fill(own, 0.0)), None if snapshot is None else snapshot.masked_fill(own, 0.0)
