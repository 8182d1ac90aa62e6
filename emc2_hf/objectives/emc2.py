"""EMC²: Metropolis–Hastings negative sampling with persistent chains per training example (Yau et al., 2024).

Two estimators share the chains and the sweep:

* :class:`EMC2Objective` (``"emc2"``) — exact: every chain state is a view the objective contains, re-encoded with
  the current model, so with frozen features the expected negative weights are eq. (5) over the objective's whole
  negative set.
* :class:`EMC2InBatchObjective` (``"emc2_in_batch"``) — the cheap variant that encodes nothing extra: a state outside
  the batch keeps its stale score and its samples are replaced by the in-batch softmax, so its expectation is biased
  toward the softmax over the batch's negatives (decoupled InfoNCE, ``"dcl"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sampling.metropolis_hastings import (
    OUTSIDE_BATCH,
    metropolis_hastings_sweep,
    one_candidate_per_example,
    uniform_proposals,
    uniform_proposals_from_lists,
)
from ..sampling.sample_state import EMPTY_STATE, MarkovChainState
from .problem import ContrastiveProblem
from .surrogate import ContrastiveObjective

CITATION = (
    "@inproceedings{yau2024emc2,\n  title={{EMC}$^2$: Efficient {MCMC} Negative Sampling for Contrastive Learning "
    "with Global Convergence},\n  author={Yau, Chung-Yiu and Wai, Hoi-To and Raman, Parameswaran and Sarkar, "
    "Soumajyoti and Hong, Mingyi},\n  booktitle={ICML},\n  year={2024}\n}"
)


def visit_frequency_weights(
    samples: torch.Tensor, log_scores: torch.Tensor, negative_mask: torch.Tensor
) -> torch.Tensor:
    """Negative weights from post-burn-in chain samples (eq. (11)).

    Args:
        samples: ``LongTensor[A, S]``, candidate column of each sample (``OUTSIDE_BATCH``: a state outside the
            batch, only in the in-batch variant).
        log_scores: ``FloatTensor[A, C]``, ``β s``.
        negative_mask: ``BoolTensor[A, C]``, the negatives an outside sample is spread over (the in-batch ones).

    Returns:
        ``FloatTensor[A, C]``: ``w_ac = (n_ac + n_a^out · softmax_{neg(a)}(β s_a·)_c) / S``, rows summing to 1.
    """
    inside = samples != OUTSIDE_BATCH
    visits = torch.zeros_like(log_scores, dtype=torch.float32).scatter_add_(1, samples.clamp(min=0), inside.float())
    num_outside = (~inside).sum(dim=1, dtype=torch.float32)
    if bool((num_outside > 0).any()):
        in_batch_softmax = log_scores.float().masked_fill(~negative_mask, float("-inf")).softmax(dim=1)
        visits = visits + num_outside[:, None] * in_batch_softmax
    return visits / samples.shape[1]


def rao_blackwellized_weights(sweep, log_scores: torch.Tensor, negative_mask: torch.Tensor) -> torch.Tensor:
    """Negative weights with every post-burn-in sample replaced by its expectation given the step's proposal.

    Sample ``r`` is the state after proposal ``z'_r`` from state ``z_r``; ``E[δ(Z_{r+1}) | z_r, z'_r] = α_r δ(z'_r) +
    (1 − α_r) δ(z_r)`` with ``α_r = min(1, exp(β s(z'_r) − β s(z_r)))`` (Metropolis–Hastings "waste recycling").
    Conditioning leaves the expectation of eq. (11)'s estimate unchanged (the tower rule) and lowers the variance of
    every term, so the weights are those of the visit frequencies in expectation, with less noise: a rejected
    proposal still contributes ``α_r``.

    Args:
        sweep: a :class:`~emc2_hf.sampling.SweepResult`.
        log_scores: ``FloatTensor[A, C]``, ``β s``.
        negative_mask: ``BoolTensor[A, C]``, the negatives an ``OUTSIDE_BATCH`` state is spread over (in-batch
            variant).

    Returns:
        ``FloatTensor[A, C]``, rows summing to 1.
    """
    alpha = sweep.acceptance_probabilities.float()
    columns = torch.cat([sweep.proposed_columns, sweep.previous_columns], dim=1)
    mass = torch.cat([alpha, 1.0 - alpha], dim=1)
    inside = columns != OUTSIDE_BATCH
    weights = torch.zeros_like(log_scores, dtype=torch.float32).scatter_add_(
        1, columns.clamp(min=0), mass * inside.float()
    )
    outside = (mass * (~inside).float()).sum(dim=1)
    if bool((outside > 0).any()):
        in_batch_softmax = log_scores.float().masked_fill(~negative_mask, float("-inf")).softmax(dim=1)
        weights = weights + outside[:, None] * in_batch_softmax
    return weights / alpha.shape[1]


def conditional_weights(
    log_scores: torch.Tensor, candidate_sets: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Negative weights as the softmax of ``β s`` over each sweep's candidate set, averaged over the given sets.

    Given the set ``S`` a sweep runs on, an exact chain's start is distributed as eq. (5) restricted to ``S``, and so
    is every sample after it (see :class:`EMC2Objective`): ``E[δ(Z_r) | S] = softmax_{c ∈ S}(β s_c)``. Replacing the
    samples by this conditional expectation keeps the estimator's expectation (the tower rule) and removes the
    sampling noise of the sweep; averaging it over several random view picks (each an equally valid ``S``) removes
    part of the noise of the picks.

    Args:
        log_scores: ``FloatTensor[A, C]``, ``β s``.
        candidate_sets: ``[(columns [A, K], counts [A]), …]`` from :func:`~emc2_hf.sampling.one_candidate_per_example`.

    Returns:
        ``FloatTensor[A, C]``, rows summing to 1.
    """
    total = torch.zeros_like(log_scores, dtype=torch.float32)
    for columns, counts in candidate_sets:
        valid = torch.arange(columns.shape[1], device=columns.device)[None, :] < counts[:, None]
        in_set = torch.zeros_like(log_scores, dtype=torch.bool).scatter_(1, columns, valid)
        total += log_scores.float().masked_fill(~in_set, float("-inf")).softmax(dim=1)
    return total / len(candidate_sets)


def matching_columns(
    problem: ContrastiveProblem, keys: torch.Tensor, views: torch.Tensor, columns: int
) -> torch.Tensor:
    """``LongTensor[A]``: the first of the first ``columns`` negative columns of anchor ``a`` that is the view
    ``(keys[a], views[a])``, or ``OUTSIDE_BATCH`` if none is."""
    matches = (
        (problem.candidate_keys[None, :columns] == keys[:, None])
        & (problem.candidate_views[None, :columns] == views[:, None])
        & problem.negative_mask[:, :columns]
    )
    return torch.where(matches.any(dim=1), matches.long().argmax(dim=1), OUTSIDE_BATCH)


def _num_batch_examples(problem: ContrastiveProblem) -> int:
    """How many distinct examples the batch's own candidates show."""
    return int(torch.unique(problem.candidate_keys[: problem.num_batch_columns]).numel())


class EMC2Objective(ContrastiveObjective):
    r"""The EMC² estimator of the gradient of the global contrastive loss (1) (Algorithm 1, eq. (9)–(11)), exact.

    **Chains.** Every anchor view keeps its own chain: example ``i`` has ``V`` chains, one per state slot (two fresh
    views: slot = view 1 or 2; ``A`` fixed augmentations: slot = the augmentation), because the two views of an image
    are different anchors with different targets (eq. (5) of each view) — one chain shared by both views is biased
    whenever the views differ. A chain's state is a *view*: ``(dataset index j, view key)``, the view key being what
    re-creates exactly that candidate (the fixed augmentation, or the seed of a fresh one), so the state is a negative
    the objective could contain. Memory: 20 bytes per chain, ``20 V`` per example.

    **One step** (per anchor ``a`` with stored state ``z``):

    1. ``z`` is a column of the problem: the batch's view when the batch holds it, else a *state column* — the caller
       re-encodes ``z`` with the current model and autograd (:func:`~emc2_hf.objectives.states_to_encode` lists
       what to encode; the collator delivers those images). It is scored with the current features.
    2. The sweep runs over ``S_a``: one view of each negative image of the batch, picked uniformly from its views in
       the batch (:func:`~emc2_hf.sampling.one_candidate_per_example`), and ``z`` in place of its own image's pick.
       ``R`` proposals uniform over ``S_a``, accepted with probability ``min(1, exp(β s(z')) / exp(β s(z)))``
       (eq. (9)); the states after the burn-in ``P`` are the samples, and the negative weights are their visit
       frequencies ``w_ac = n_ac / (R − P)`` — the surrogate's gradient is exactly eq. (11).
    3. The last state (its dataset index, view key and similarity) is stored for the anchor's next visit.

    **Why it is exact.** With frozen features, let ``z ~ p_a`` (eq. (5) over every view of every other image) and
    the batch be a uniform draw independent of ``z`` (i.i.d. batches, or an epoch-wise shuffle: an image is in one
    batch per epoch, and its next batch is independent of its chain). Every set ``S`` arises with the same
    probability from each of its members as the start — each image of ``S`` shows one uniform view, whether it came
    from the batch or is ``z``'s — so given ``S``, ``z ~ p_a`` restricted to ``S``; Metropolis–Hastings with a
    symmetric proposal on ``S`` keeps that law, so every sample and the stored state are again ``~ p_a``, for any
    ``R`` and ``P``. Proposing only in-batch views (the paper's proposal) makes ``z`` transient — once left it is
    never proposed again — and the sweep targets the softmax restricted to the batch. ``tests/test_exact_mode.py``
    checks the expected weights against eq. (5) with fixed and with fresh views, i.i.d. and epoch-wise batches.
    With fresh augmentations each epoch gives an image new anchor views, so a chain starts from a sample for the
    previous view of its image: the bias is the difference between the targets of two views of one image, which
    training makes small (measured in that test).

    Starts the collator read from a slightly stale table (a sampler that repeats an image before its chain was
    written back) are still valid: the stale state is ``~ p_a`` and independent of the new batch.

    Args:
        num_samples: ``m``, the training-set size.
        inverse_temperature: ``β``.
        num_proposals: ``R`` proposals per anchor per step; ``None`` means ``2b − 2`` (the paper's, b = images in
            the global batch).
        burn_in: ``P``; ``None`` means ``R // 2`` (paper: 31 at b = 32, 255 at b = 256).
        seed: key of the picks, proposals and uniforms (with the step).
        num_slots: ``V``, chains per example (2 for two fresh views; ``A`` for ``A`` fixed augmentations).
        weighting: ``"conditional"`` (default: the lowest-variance of the three in the frozen-feature tests),
            ``"recycled"`` or ``"samples"`` (eq. (11) as written); all three have the same expectation.
        view_choices: views of each negative image a sweep may pick from.
        chain_fraction: ``q``, the fraction of anchor views that run their chain (the rest use the in-batch
            softmax, which is also the control variate; unbiased for every ``q``).

    Inputs: a :class:`~emc2_hf.objectives.ContrastiveProblem` whose state columns hold the re-encoded starts, or
    ``embeddings [2b, d]``, ``dataset_indices [b]`` and the state arguments of
    :func:`~emc2_hf.objectives.two_view_problem`. Logs ``acceptance_rate``, ``reencoded_fraction`` (anchors whose
    start needed a state column) and ``start_sample_fraction`` (post-burn-in samples still on the start).
    """

    name = "emc2"
    title = "EMC²"
    citation = CITATION
    training_arguments = {
        "num_proposals": "num_proposals",
        "burn_in": "burn_in",
        "weighting": "emc2_weighting",
        "chain_fraction": "emc2_chain_fraction",
    }
    reencodes_chain_states = True

    def __init__(
        self,
        num_samples: int,
        inverse_temperature: float,
        num_proposals: int | None = None,
        burn_in: int | None = None,
        seed: int = 0,
        num_slots: int = 2,
        weighting: str | None = None,
        view_choices: int = 1,
        chain_fraction: float = 1.0,
    ) -> None:
        super().__init__(inverse_temperature, seed)
        weighting = self.default_weighting if weighting is None else weighting
        if weighting not in self.weightings:
            raise ValueError(f"weighting must be one of {self.weightings} for {self.name}, got {weighting!r}")
        if view_choices < 1:
            raise ValueError(f"view_choices must be >= 1, got {view_choices}")
        if not 0.0 < chain_fraction <= 1.0:
            raise ValueError(f"chain_fraction must be in (0, 1], got {chain_fraction}")
        if chain_fraction < 1.0 and not self.reencodes_chain_states:
            raise ValueError(f"chain_fraction applies to the emc2 objective, not {self.name}")
        if num_proposals is not None and num_proposals < 1:
            raise ValueError(f"num_proposals (R) must be >= 1, got {num_proposals}")
        if burn_in is not None and burn_in < 0:
            raise ValueError(f"burn_in (P) must be >= 0, got {burn_in}")
        if num_proposals is not None and burn_in is not None and burn_in >= num_proposals:
            raise ValueError(
                f"burn_in (P = {burn_in}) must be smaller than num_proposals (R = {num_proposals}) so that R − P "
                "samples remain after the burn-in"
            )
        self.num_proposals = num_proposals
        self.burn_in = burn_in
        self.weighting = weighting
        self.view_choices = int(view_choices)
        self.chain_fraction = float(chain_fraction)
        self.chains = MarkovChainState(num_samples, num_slots)

    weightings = ("samples", "recycled", "conditional")
    """``samples``: eq. (11)'s visit frequencies; ``recycled``: each sample replaced by its expectation given the
    step's proposal (:func:`rao_blackwellized_weights`); ``conditional``: the samples replaced by their expectation
    given the sweep's candidate set (:func:`conditional_weights`)."""
    default_weighting = "conditional"

    def _chained(self, problem: ContrastiveProblem) -> torch.Tensor | None:
        """``BoolTensor[A]`` of the anchors that run their chain this step, or ``None`` for all of them."""
        if self.chain_fraction >= 1.0:
            return None
        if problem.chain_anchors is None:
            raise ValueError(
                f"chain_fraction={self.chain_fraction} needs the problem's chain_anchors (which anchors run their "
                "chain this step, e.g. emc2_hf.sampling.chain_selection; the collator delivers them as chain_active)"
            )
        return problem.chain_anchors

    def _with_control_variate(
        self, weights: torch.Tensor, log_scores: torch.Tensor, problem: ContrastiveProblem, chained: torch.Tensor
    ) -> torch.Tensor:
        """``w = w_batch + 1[chained] / q · (w_chain − w_batch)``: unbiased for ``E[w_chain]`` when each anchor runs
        its chain with probability ``q`` independently of the batch, with the in-batch softmax ``w_batch`` as the
        control variate (and as the estimate of the anchors that do not run their chain)."""
        negatives = F.pad(problem.batch_negative_mask, (0, log_scores.shape[1] - problem.num_batch_columns))
        batch_softmax = log_scores.float().masked_fill(~negatives, float("-inf")).softmax(dim=1)
        correction = (weights - batch_softmax) / self.chain_fraction
        return batch_softmax + chained[:, None].float() * correction

    def _sample_weights(self, sweep, log_scores: torch.Tensor, negative_mask: torch.Tensor) -> torch.Tensor:
        if self.weighting == "recycled":
            return rao_blackwellized_weights(sweep, log_scores, negative_mask)
        return visit_frequency_weights(sweep.samples, log_scores, negative_mask)

    def chain_starts(self, anchor_keys: torch.Tensor, anchor_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(state_index [A], state_view [A])``: where the chains of these anchors start (what to re-encode)."""
        device = self.chains.state_index.device
        index, view, _ = self.chains.read(anchor_keys.to(device), anchor_slots.to(device))
        return index, view

    def sweep_lengths(self, num_images: int) -> tuple[int, int]:
        """``(R, P)`` for a batch of ``num_images`` images."""
        num_proposals = self.num_proposals if self.num_proposals is not None else 2 * num_images - 2
        burn_in = self.burn_in if self.burn_in is not None else num_proposals // 2
        if num_proposals < 1 or burn_in >= num_proposals:
            raise ValueError(
                f"burn_in (P = {burn_in}) must be smaller than num_proposals (R = {num_proposals}, which defaults to "
                f"2b − 2 = {2 * num_images - 2} for a batch of b = {num_images} images): lower --burn_in, set "
                "--num_proposals, or raise the batch size"
            )
        return num_proposals, burn_in

    def validate_batch_size(self, num_images: int) -> None:
        super().validate_batch_size(num_images)
        self.sweep_lengths(num_images)

    def _starts(self, problem: ContrastiveProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index, view, stored similarity)`` of each anchor's start: delivered with the problem, or stored."""
        index, view, similarity = self.chains.read(problem.anchor_keys, problem.anchor_slots)
        if problem.start_keys is not None:
            index, view = problem.start_keys, problem.start_views
        return index, view, similarity

    def negative_weights(
        self, problem: ContrastiveProblem, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        similarities = problem.similarities.detach()
        log_scores = self.log_score_scale(problem) * similarities  # [A, C] float32, current β
        num_proposals, burn_in = self.sweep_lengths(_num_batch_examples(problem))

        start_index, start_view, _ = self._starts(problem)
        chained = self._chained(problem)
        if chained is not None:  # anchors that do not run their chain this step start from nothing, unread
            start_index = torch.where(chained, start_index, EMPTY_STATE)
        start_column = matching_columns(problem, start_index, start_view, problem.similarities.shape[1])
        empty = start_index == EMPTY_STATE
        missing = ~empty & (start_column == OUTSIDE_BATCH)
        if bool(missing.any()):
            states = sorted(set(zip(start_index[missing].tolist(), start_view[missing].tolist(), strict=True)))
            raise ValueError(
                f"EMC2Objective: the chain states (dataset index, view) {states[:8]} are not columns of the problem; "
                "encode states_to_encode(...) with the current model and pass them as state columns (the "
                "ContrastiveTrainer does this through the collator), or use the emc2_in_batch objective"
            )
        columns, counts = one_candidate_per_example(
            problem.negative_mask, problem.candidate_keys, start_column, generator, problem.num_batch_columns
        )
        proposals = uniform_proposals_from_lists(columns, counts, num_proposals, generator)
        initial_log_score = torch.where(
            empty, float("-inf"), log_scores.gather(1, start_column.clamp(min=0)[:, None]).squeeze(1)
        )
        sweep = metropolis_hastings_sweep(log_scores, proposals, start_column, initial_log_score, burn_in, generator)
        if self.weighting == "conditional":
            candidate_sets = [(columns, counts)] + [
                one_candidate_per_example(
                    problem.negative_mask, problem.candidate_keys, start_column, generator, problem.num_batch_columns
                )
                for _ in range(self.view_choices - 1)
            ]
            weights = conditional_weights(log_scores, candidate_sets)
        else:
            weights = self._sample_weights(sweep, log_scores, problem.negative_mask)

        final = sweep.final_column
        written = slice(None) if chained is None else chained
        self.chains.write(
            problem.anchor_keys[written],
            problem.anchor_slots[written],
            problem.candidate_keys[final][written],
            problem.candidate_views[final][written],
            similarities.gather(1, final[:, None]).squeeze(1)[written],
        )
        if chained is not None:
            weights = self._with_control_variate(weights, log_scores, problem, chained)
        on_start = (sweep.samples == start_column[:, None]) & ~empty[:, None]
        metrics = {
            "acceptance_rate": sweep.num_accepted.sum() / float(sweep.num_accepted.numel() * num_proposals),
            "reencoded_fraction": (start_column >= problem.num_batch_columns).float().mean(),
            "start_sample_fraction": on_start.float().mean(),
        }
        return weights, metrics

    def get_config_dict(self) -> dict[str, float | int | str]:
        return {
            **super().get_config_dict(),
            "num_proposals": "2b-2" if self.num_proposals is None else self.num_proposals,
            "burn_in": "R//2" if self.burn_in is None else self.burn_in,
            "chains_per_example": self.chains.num_slots,
            "weighting": self.weighting,
            **({"view_choices": self.view_choices} if self.weighting == "conditional" else {}),
            **({"chain_fraction": self.chain_fraction} if self.chain_fraction < 1.0 else {}),
        }

    def card_settings(self, global_batch_size: int) -> dict[str, float | int | str]:
        num_proposals, burn_in = self.sweep_lengths(global_batch_size)
        return {
            "inverse_temperature": self.inverse_temperature,
            "num_proposals": num_proposals
            if self.num_proposals is not None
            else f"{num_proposals} (default 2b − 2 at b = {global_batch_size})",
            "burn_in": burn_in if self.burn_in is not None else f"{burn_in} (default R // 2)",
            "chains_per_example": self.chains.num_slots,
            "weighting": self.weighting,
            **({"view_choices": self.view_choices} if self.weighting == "conditional" else {}),
            **({"chain_fraction": self.chain_fraction} if self.chain_fraction < 1.0 else {}),
        }


class EMC2InBatchObjective(EMC2Objective):
    """EMC² without re-encoding: cheap, and biased toward the softmax over the batch's negatives.

    The chains are those of :class:`EMC2Objective`, but nothing outside the batch is encoded. A start that the batch
    holds is re-scored with the current model; any other start keeps the similarity stored when it was last scored
    (stale as the model moves). Proposals are the paper's: uniform over the anchor's ``2b − 2`` in-batch negatives,
    so a start outside the batch, once left, is never proposed again. A post-burn-in sample still sitting on such a
    state has no feature to differentiate; it is replaced by the in-batch estimate of the same expectation — the
    softmax of ``β s`` over the anchor's in-batch negatives — so::

        w_ac = (n_ac + n_a^out · softmax_{k ∈ neg(a)}(β s_ak)_c) / (R − P),     Σ_c w_ac = 1.

    Both replacements pull the estimator toward the in-batch softmax, i.e. toward decoupled InfoNCE (``"dcl"``) with
    sampling noise: with frozen features its expected weights sit near the batch softmax, not eq. (5). The fraction of
    replaced samples is logged as ``outside_batch_sample_fraction``. Kept as a named baseline and for users who cannot
    afford the extra images of the exact objective.
    """

    name = "emc2_in_batch"
    title = "EMC² in-batch variant (no re-encoding; biased toward the batch softmax)"
    reencodes_chain_states = False
    weightings = ("samples", "recycled")
    default_weighting = "recycled"

    def negative_weights(
        self, problem: ContrastiveProblem, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        similarities = problem.similarities.detach()
        beta = self.log_score_scale(problem)
        log_scores = beta * similarities
        num_proposals, burn_in = self.sweep_lengths(_num_batch_examples(problem))
        in_batch_negatives = F.pad(problem.batch_negative_mask, (0, log_scores.shape[1] - problem.num_batch_columns))

        start_index, start_view, start_similarity = self._starts(problem)
        start_column = matching_columns(problem, start_index, start_view, problem.num_batch_columns)
        in_batch = start_column != OUTSIDE_BATCH
        rescored = log_scores.gather(1, start_column.clamp(min=0)[:, None]).squeeze(1)
        initial_log_score = torch.where(in_batch, rescored, beta * start_similarity)
        proposals = uniform_proposals(in_batch_negatives, num_proposals, generator)
        sweep = metropolis_hastings_sweep(log_scores, proposals, start_column, initial_log_score, burn_in, generator)
        weights = self._sample_weights(sweep, log_scores, in_batch_negatives)

        final = sweep.final_column
        moved = final != OUTSIDE_BATCH
        column = final.clamp(min=0)
        self.chains.write(
            problem.anchor_keys,
            problem.anchor_slots,
            torch.where(moved, problem.candidate_keys[column], start_index),
            torch.where(moved, problem.candidate_views[column], start_view),
            torch.where(moved, similarities.gather(1, column[:, None]).squeeze(1), start_similarity),
        )
        num_outside = (sweep.samples == OUTSIDE_BATCH).sum(dim=1, dtype=torch.float32)
        metrics = {
            "acceptance_rate": sweep.num_accepted.sum() / float(sweep.num_accepted.numel() * num_proposals),
            "outside_batch_sample_fraction": num_outside.sum()
            / float(num_outside.numel() * (num_proposals - burn_in)),
        }
        return weights, metrics
