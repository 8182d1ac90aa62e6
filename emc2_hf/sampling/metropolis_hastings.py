"""The vectorised Metropolis–Hastings sweep of EMC² (paper, Algorithm 1, lines 4–8 and eq. (9)).

One call advances one Markov chain per anchor by ``num_proposals`` accept/reject steps. Proposals are drawn
uniformly (with replacement) from the anchor's candidate negatives; a proposal ``z'`` replaces the current state
``z`` when ``log U < ℓ(z') − ℓ(z)`` with ``U ~ Uniform(0, 1)`` and ``ℓ = β·s`` the log-score, which is the
acceptance probability ``min(1, exp(β s(z')) / exp(β s(z)))`` of eq. (9). The work is vectorised over anchors;
only the ``R`` sequential steps of the chains loop in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OUTSIDE_BATCH = -1
"""Column value of a chain state that is not among the batch's candidates (its feature is unavailable)."""


@dataclass
class SweepResult:
    """What one sweep produced.

    Attributes:
        samples: ``LongTensor[A, R - P]``, the candidate column of the chain state after each post-burn-in
            proposal ``r = P, …, R − 1`` (Algorithm 1, line 7); ``OUTSIDE_BATCH`` where the chain still sat on a
            state outside the batch.
        final_column: ``LongTensor[A]``, the column of the last state (``OUTSIDE_BATCH`` if the chain never left an
            out-of-batch state).
        final_log_score: ``FloatTensor[A]``, the log-score ``β·s`` of the last state.
        num_accepted: ``LongTensor[A]``, how many of the ``R`` proposals each chain accepted.
        previous_columns: ``LongTensor[A, R - P]``, the state before each post-burn-in proposal.
        proposed_columns: ``LongTensor[A, R - P]``, each post-burn-in proposal.
        acceptance_probabilities: ``FloatTensor[A, R - P]``, ``min(1, exp(ℓ(z') − ℓ(z)))`` of each post-burn-in
            proposal, so ``E[δ(sample) | previous, proposal] = α δ(proposal) + (1 − α) δ(previous)``.
    """

    samples: torch.Tensor
    final_column: torch.Tensor
    final_log_score: torch.Tensor
    num_accepted: torch.Tensor
    previous_columns: torch.Tensor
    proposed_columns: torch.Tensor
    acceptance_probabilities: torch.Tensor


def _candidate_columns(candidate_mask: torch.Tensor) -> torch.Tensor:
    """``LongTensor[A, K]``: the columns of each anchor's ``K`` candidates, from ``candidate_mask: BoolTensor[A, C]``.

    Raises a ``ValueError`` unless every anchor has the same number ``K ≥ 1`` of candidates.
    """
    num_anchors = candidate_mask.shape[0]
    counts = candidate_mask.sum(dim=1)
    num_candidates = int(counts[0]) if num_anchors else 0
    if num_candidates == 0 or bool((counts != num_candidates).any()):
        raise ValueError(
            "every anchor needs the same, non-zero number of candidate negatives; got counts "
            f"{counts.tolist()[:8]}{'…' if num_anchors > 8 else ''}. A batch needs at least 2 distinct images."
        )
    return candidate_mask.nonzero()[:, 1].view(num_anchors, num_candidates)


def uniform_proposals(
    candidate_mask: torch.Tensor, num_proposals: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``num_proposals`` columns per anchor uniformly, with replacement, among its candidates.

    Args:
        candidate_mask: ``BoolTensor[A, C]``, ``True`` where column ``c`` is a negative of anchor ``a``. Every anchor
            must have the same number ``K ≥ 1`` of candidates (true of in-batch negatives).
        num_proposals: ``R``.
        generator: source of randomness (on the mask's device).

    Returns:
        ``LongTensor[A, R]`` of candidate columns.
    """
    candidate_columns = _candidate_columns(candidate_mask)
    num_anchors, num_candidates = candidate_columns.shape
    picks = torch.randint(
        num_candidates, (num_anchors, num_proposals), generator=generator, device=candidate_mask.device
    )
    return candidate_columns.gather(1, picks)


def one_candidate_per_example(
    negative_mask: torch.Tensor,
    candidate_keys: torch.Tensor,
    forced_columns: torch.Tensor,
    generator: torch.Generator | None = None,
    num_random_columns: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every anchor, one of its negative columns per example, chosen uniformly — or the forced one.

    This builds the state space of one exact EMC² sweep (see :class:`~emc2_hf.objectives.EMC2Objective`): the batch
    shows two views of each image, and an anchor's chain runs over *one* view of each negative image (a uniform pick
    of the two, which is a uniform view of the image), with the chain's start forced as its own image's view.

    Args:
        negative_mask: ``BoolTensor[A, C]``, each anchor's negatives.
        candidate_keys: ``LongTensor[C]``, the example (dataset index) of each column; columns with one key are views
            of one example.
        forced_columns: ``LongTensor[A]``, a negative column that must be its example's pick (``-1``: none).
        generator: source of the random picks.
        num_random_columns: only columns ``0 … num_random_columns − 1`` are picked at random; later columns are
            picked only when forced (EMC²'s state columns, each the start of the anchors that own it). The random
            numbers then depend on the batch's own columns alone, so extra state columns (e.g. encoded by another
            process) never change the picks. Default: every column.

    Returns:
        ``(columns [A, K], counts [A])``: anchor ``a``'s picks are ``columns[a, :counts[a]]`` (in column order; the
        rest is padding), one per example that has a negative column for ``a``.
    """
    num_anchors, num_columns = negative_mask.shape
    device = negative_mask.device
    _, group = torch.unique(candidate_keys, return_inverse=True)
    num_groups = int(group.max()) + 1 if num_columns else 0
    group = group[None, :].expand(num_anchors, num_columns)
    num_random_columns = num_columns if num_random_columns is None else num_random_columns
    priority = torch.rand((num_anchors, num_random_columns), generator=generator, device=device, dtype=torch.float64)
    priority = torch.nn.functional.pad(priority, (0, num_columns - num_random_columns), value=-1.0)
    priority = priority.masked_fill(~negative_mask, -1.0)
    forced = forced_columns >= 0
    priority[torch.arange(num_anchors, device=device)[forced], forced_columns[forced]] = 2.0
    best = torch.full((num_anchors, num_groups), -2.0, dtype=torch.float64, device=device)
    best = best.scatter_reduce(1, group, priority, reduce="amax")
    chosen = (priority == best.gather(1, group)) & negative_mask & (priority >= 0)
    counts = chosen.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("an anchor has no negative candidates; a batch needs at least 2 distinct images")
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)
    return order[:, : int(counts.max())], counts


def uniform_proposals_from_lists(
    columns: torch.Tensor, counts: torch.Tensor, num_proposals: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``num_proposals`` columns per anchor uniformly, with replacement, from ``columns[a, :counts[a]]``.

    Args:
        columns: ``LongTensor[A, K]``, each anchor's candidate columns (padded past ``counts``).
        counts: ``LongTensor[A]``, ``1 ≤ counts[a] ≤ K``.
        num_proposals: ``R``.
        generator: source of randomness (on the columns' device).

    Returns:
        ``LongTensor[A, R]`` of candidate columns.
    """
    uniforms = torch.rand(
        (columns.shape[0], num_proposals), generator=generator, device=columns.device, dtype=torch.float64
    )
    slots = torch.minimum((uniforms * counts[:, None]).long(), counts[:, None] - 1)
    return columns.gather(1, slots)


def metropolis_hastings_sweep(
    log_scores: torch.Tensor,
    proposals: torch.Tensor,
    initial_column: torch.Tensor,
    initial_log_score: torch.Tensor,
    burn_in: int,
    generator: torch.Generator | None = None,
) -> SweepResult:
    """Run ``R`` Metropolis–Hastings steps for every anchor's chain at once (eq. (9)).

    Args:
        log_scores: ``FloatTensor[A, C]``, ``ℓ_ac = β·s(anchor a, candidate c)``; read in float32.
        proposals: ``LongTensor[A, R]``, the proposed column at each step (see :func:`uniform_proposals` and
            :func:`uniform_proposals_from_lists`).
        initial_column: ``LongTensor[A]``, the chain's current column, or ``OUTSIDE_BATCH``.
        initial_log_score: ``FloatTensor[A]``, the log-score of the current state; ``-inf`` for an empty chain, whose
            first proposal is then always accepted.
        burn_in: ``P``, the number of leading steps whose states are not returned as samples (``0 ≤ P < R``).
        generator: source of the uniforms ``U``.

    Returns:
        A :class:`SweepResult`.
    """
    num_anchors, num_proposals = proposals.shape
    if not 0 <= burn_in < num_proposals:
        raise ValueError(f"burn_in must satisfy 0 <= burn_in < num_proposals = {num_proposals}; got {burn_in}")
    with torch.no_grad():
        proposal_log_scores = log_scores.float().gather(1, proposals)
        log_uniforms = torch.rand(
            (num_proposals, num_anchors), generator=generator, device=log_scores.device, dtype=torch.float32
        ).log_()
        proposals_by_step = proposals.t().contiguous()
        proposal_log_scores_by_step = proposal_log_scores.t().contiguous()
        # log U < ℓ(z') − ℓ(z)  ⇔  ℓ(z') − log U > ℓ(z): the threshold each proposal must beat.
        thresholds = proposal_log_scores_by_step - log_uniforms

        # Three kernels per step: after the burn-in the new column is written straight into its sample row.
        column = initial_column.clone()
        log_score = initial_log_score.float().clone()
        num_samples = num_proposals - burn_in
        samples = torch.empty((num_samples, num_anchors), dtype=torch.long, device=log_scores.device)
        previous_log_scores = torch.empty((num_samples, num_anchors), dtype=torch.float32, device=log_scores.device)
        accepted = torch.empty((num_proposals, num_anchors), dtype=torch.bool, device=log_scores.device)
        for step in range(num_proposals):
            if step == burn_in:
                first_previous = column.clone()
            accept = torch.gt(thresholds[step], log_score, out=accepted[step])
            if step >= burn_in:
                previous_log_scores[step - burn_in].copy_(log_score)
                column = torch.where(accept, proposals_by_step[step], column, out=samples[step - burn_in])
            else:
                column = torch.where(accept, proposals_by_step[step], column)
            log_score = torch.where(accept, proposal_log_scores_by_step[step], log_score)
        previous_columns = torch.cat([first_previous[None], samples[:-1]])
        log_ratio = (proposal_log_scores_by_step[burn_in:] - previous_log_scores).clamp(max=0.0)
        acceptance = log_ratio.exp().nan_to_num(nan=1.0)  # a previous score of -inf (empty chain): always accepted
    return SweepResult(
        samples=samples.t(),
        final_column=column,
        final_log_score=log_score,
        num_accepted=accepted.sum(dim=0),
        previous_columns=previous_columns.t(),
        proposed_columns=proposals_by_step[burn_in:].t(),
        acceptance_probabilities=acceptance.t(),
    )
