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
    """

    samples: torch.Tensor
    final_column: torch.Tensor
    final_log_score: torch.Tensor
    num_accepted: torch.Tensor


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


def proposals_with_start(
    candidate_mask: torch.Tensor,
    num_proposals: int,
    start_column: torch.Tensor,
    start_slots: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Like :func:`uniform_proposals`, plus ``start_slots[a]`` slots that propose anchor ``a``'s start column.

    This is the proposal of EMC²'s exact mode (see :class:`~emc2_hf.objectives.EMC2Objective`).

    Anchor ``a`` proposes each of its ``K`` candidates with probability ``1 / (K + n_a)`` and ``start_column[a]``
    with probability ``n_a / (K + n_a)``, ``n_a = start_slots[a]``. With ``n_a = 2`` for a start that is outside the
    batch and re-encoded as one column, every *image* of the set batch ∪ {start} is proposed with the same probability
    (an in-batch image has two view columns), so the proposal is symmetric on that set.

    Args:
        candidate_mask: ``BoolTensor[A, C]``, the same number ``K ≥ 1`` of candidates for every anchor.
        num_proposals: ``R``.
        start_column: ``LongTensor[A]``, the column proposed by the extra slots (ignored where ``n_a = 0``).
        start_slots: ``LongTensor[A]``, ``n_a ≥ 0``.
        generator: source of randomness (on the mask's device).

    Returns:
        ``LongTensor[A, R]`` of candidate columns.
    """
    candidate_columns = _candidate_columns(candidate_mask)
    num_anchors, num_candidates = candidate_columns.shape
    num_slots = (num_candidates + start_slots.to(candidate_mask.device)).long()[:, None]  # [A, 1]
    uniforms = torch.rand(
        (num_anchors, num_proposals), generator=generator, device=candidate_mask.device, dtype=torch.float64
    )
    slots = torch.minimum((uniforms * num_slots).long(), num_slots - 1)
    on_candidate = slots < num_candidates
    picked = candidate_columns.gather(1, slots.clamp(max=num_candidates - 1))
    return torch.where(on_candidate, picked, start_column.to(candidate_mask.device)[:, None])


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
            :func:`proposals_with_start`).
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
        samples = torch.empty((num_proposals - burn_in, num_anchors), dtype=torch.long, device=log_scores.device)
        accepted = torch.empty((num_proposals, num_anchors), dtype=torch.bool, device=log_scores.device)
        for step in range(num_proposals):
            accept = torch.gt(thresholds[step], log_score, out=accepted[step])
            if step >= burn_in:
                column = torch.where(accept, proposals_by_step[step], column, out=samples[step - burn_in])
            else:
                column = torch.where(accept, proposals_by_step[step], column)
            log_score = torch.where(accept, proposal_log_scores_by_step[step], log_score)
    return SweepResult(
        samples=samples.t(),
        final_column=column,
        final_log_score=log_score,
        num_accepted=accepted.sum(dim=0),
    )
