"""EMC²: Metropolis–Hastings negative sampling with one persistent chain per training example (Yau et al., 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sampling.metropolis_hastings import (
    OUTSIDE_BATCH,
    metropolis_hastings_sweep,
    proposals_with_start,
    uniform_proposals,
)
from ..sampling.sample_state import EMPTY_STATE, MarkovChainState
from .surrogate import ContrastiveObjective
from .views import ViewPairs


def visit_frequency_weights(
    samples: torch.Tensor, log_scores: torch.Tensor, negative_mask: torch.Tensor
) -> torch.Tensor:
    """Negative weights from post-burn-in chain samples (eq. (11)).

    Args:
        samples: ``LongTensor[A, S]``, candidate column of each sample (``OUTSIDE_BATCH``: a state outside
            the batch).
        log_scores: ``FloatTensor[A, C]``, ``β s``.
        negative_mask: ``BoolTensor[A, C]``, the negatives an outside sample is spread over (EMC² passes the
            in-batch ones).

    Returns:
        ``FloatTensor[A, C]``: ``w_ac = (n_ac + n_a^out · softmax_{neg(a)}(β s_a·)_c) / S``, rows summing to 1.
    """
    inside = samples != OUTSIDE_BATCH
    visits = torch.zeros_like(log_scores, dtype=torch.float32).scatter_add_(1, samples.clamp(min=0), inside.float())
    num_outside = (~inside).sum(dim=1, dtype=torch.float32)
    in_batch_softmax = log_scores.float().masked_fill(~negative_mask, float("-inf")).softmax(dim=1)
    return (visits + num_outside[:, None] * in_batch_softmax) / samples.shape[1]


class EMC2Objective(ContrastiveObjective):
    """The EMC² estimator of the gradient of the global contrastive loss (1) (Algorithm 1, eq. (9)–(11)).

    Every training example ``i`` owns a Markov chain whose state is the dataset index of a negative and its log-score
    ``β s``; both views of the image share it (paper §4.1, "infinite augmentation"). Each step, every anchor view runs
    ``R`` Metropolis–Hastings proposals drawn uniformly from its ``2b − 2`` in-batch negatives, starting from the
    stored
    state; the states after the burn-in ``P`` are the samples, and the negative weights are their visit frequencies::

        w_ac = n_ac / (R − P)          (n_ac: post-burn-in samples of anchor a sitting on column c)

    which makes the surrogate's gradient exactly eq. (11). Both views start from the stored state; one of the two
    resulting chains (chosen at random) is stored for the next visit.

    **Samples on a state outside the batch.** A chain usually starts on a negative from an earlier batch whose feature
    is not in this batch (a state that *is* in the batch is mapped to its view and re-scored with the current model).
    Its stored log-score still drives the accept/reject steps, but a sample sitting there has no feature to
    differentiate. Dropping such samples (as the reference code does) silently shrinks the anchor's negative term; in
    a reference run at b = 16 that was 57% of the samples. Instead each such sample is replaced by the in-batch
    estimate of the same expectation ``E_{z∼p_x}[∇s(x, z)]``: the self-normalised importance-sampling estimate with the
    uniform in-batch proposal, i.e. the softmax of ``β s`` over the anchor's in-batch negatives — which is also the
    stationary law of the chain restricted to the batch. So::

        w_ac = (n_ac + n_a^out · softmax_{k ∈ neg(a)}(β s_ak)_c) / (R − P),     Σ_c w_ac = 1 always.

    The fraction ``n^out / (R − P)`` is logged as ``outside_batch_sample_fraction``.

    **Exact mode** (``exact=True``, ``--emc2_exact``). The caller encodes, with the current model and autograd, the
    stored states that are outside the batch — :meth:`states_to_encode` lists them — and passes them to
    :meth:`forward` as ``extra_embeddings [k, d]`` with ``extra_dataset_indices [k]``: extra candidate columns
    ``2b … 2b + k − 1`` after the views. A chain whose state is such an index starts on its column with its current
    log-score, and samples sitting there get their real weight, so that negative's feature receives its gradient like
    an in-batch negative's; no sample is ever replaced (``outside_batch_sample_fraction`` is 0), and the share of
    anchors whose start was re-encoded is logged as ``reencoded_fraction``. An extra column enters an anchor's chain
    only as that anchor's start; other anchors never propose it.

    The proposal changes with it: an anchor whose start was re-encoded proposes it through two extra slots besides
    its ``2b − 2`` in-batch negatives (an in-batch image has two view columns), i.e. uniformly over the *images* of
    ``S = batch ∪ {start}`` (:func:`~emc2_hf.sampling.proposals_with_start`). This makes each step exact: if the stored
    state ``z ∼ p_x`` (eq. (5), over the whole dataset) and the batch is a uniform draw independent of it, then given
    the set ``S`` the start is distributed as ``p_x`` restricted to ``S``; Metropolis–Hastings with a symmetric
    proposal on ``S`` keeps that law, so every sample and the stored state are again ``∼ p_x``, for any ``R`` and
    ``P``. Keeping the paper's proposal (uniform over the ``2b − 2`` in-batch negatives) would make the start
    transient — once left it is never proposed again, so the sweep targets the softmax restricted to the batch — and
    leaves a bias (in a simulation with 12 images and b = 3, its total-variation error against eq. (5) stopped near
    0.08 while this proposal's kept falling as 1/√steps). ``tests/test_exact_mode.py`` checks the visit frequencies
    against eq. (5) on a small dataset. A state is an image (paper §4.1, footnote 2): it is
    re-encoded through the deterministic evaluation transform, not a random augmentation.

    Args:
        num_samples: ``m``, the training-set size (one chain per example; 12 bytes each).
        inverse_temperature: ``β``.
        num_proposals: ``R``, Metropolis–Hastings proposals per anchor per step; ``None`` means ``2b − 2`` (paper).
        burn_in: ``P``; ``None`` means ``R // 2`` (paper: 31 at b = 32, 255 at b = 256).
        seed: key of the proposals and uniforms (with the step).
        exact: re-encoded chain states (above); :meth:`forward` then needs the ``extra_embeddings`` of
            :meth:`states_to_encode`.

    Inputs: ``embeddings [2b, d]``, ``dataset_indices [b]``; in exact mode also ``extra_embeddings [k, d]`` and
    ``extra_dataset_indices [k]`` (``k ≤ b``).
    """

    name = "emc2"
    citation = (
        "@inproceedings{yau2024emc2,\n  title={{EMC}$^2$: Efficient {MCMC} Negative Sampling for Contrastive Learning "
        "with Global Convergence},\n  author={Yau, Chung-Yiu and Wai, Hoi-To and Raman, Parameswaran and Sarkar, "
        "Soumajyoti and Hong, Mingyi},\n  booktitle={ICML},\n  year={2024}\n}"
    )

    def __init__(
        self,
        num_samples: int,
        inverse_temperature: float,
        num_proposals: int | None = None,
        burn_in: int | None = None,
        seed: int = 0,
        exact: bool = False,
    ) -> None:
        super().__init__(inverse_temperature, seed)
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
        self.chains = MarkovChainState(num_samples)
        self.exact = bool(exact)

    @property
    def accepts_extra_candidates(self) -> bool:
        return self.exact

    def states_to_encode(self, dataset_indices: torch.Tensor) -> torch.Tensor:
        """The chain states the exact mode needs encoded for a batch.

        Args:
            dataset_indices: ``LongTensor[b]``, the batch's images (all processes' under data parallelism).

        Returns:
            ``LongTensor[k]`` on the chains' device: the distinct stored states of these images that are not in the
            batch (empty chains excluded), in increasing order. Pass their embeddings to :meth:`forward` as
            ``extra_embeddings`` with these indices as ``extra_dataset_indices``.
        """
        dataset_indices = dataset_indices.to(device=self.chains.state_index.device, dtype=torch.long)
        stored = self.chains.state_index[dataset_indices]
        outside = (stored != EMPTY_STATE) & ~torch.isin(stored, dataset_indices)
        return torch.unique(stored[outside])

    def sweep_lengths(self, num_negatives: int) -> tuple[int, int]:
        """``(R, P)`` for anchors with ``num_negatives`` in-batch negatives."""
        num_proposals = self.num_proposals if self.num_proposals is not None else num_negatives
        burn_in = self.burn_in if self.burn_in is not None else num_proposals // 2
        if burn_in >= num_proposals:
            raise ValueError(
                f"burn_in (P = {burn_in}) must be smaller than num_proposals (R = {num_proposals}, which defaults to "
                f"the {num_negatives} in-batch negatives): lower burn_in or raise the batch size"
            )
        return num_proposals, burn_in

    def negative_weights(
        self, pairs: ViewPairs, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chains = self.chains
        num_images = pairs.num_images
        log_scores = self.inverse_temperature * pairs.similarities.detach()  # [2b, 2b + k] float32
        num_proposals, burn_in = self.sweep_lengths(int(pairs.in_batch_negative_mask[0].sum()))

        # Start every anchor from its image's stored state; a state that is in this batch is re-scored.
        anchor_indices = pairs.anchor_dataset_indices
        stored_index = chains.state_index[anchor_indices]
        in_batch = stored_index[:, None] == pairs.dataset_indices[None, :]  # [2b, b]
        is_in_batch = in_batch.any(dim=1)
        initial_column = torch.where(is_in_batch, in_batch.long().argmax(dim=1), OUTSIDE_BATCH)
        if self.exact:
            initial_column, reencoded = self._start_on_extra_columns(pairs, stored_index, initial_column)
        is_current = initial_column != OUTSIDE_BATCH
        rescored = log_scores.gather(1, initial_column.clamp(min=0)[:, None]).squeeze(1)
        initial_log_score = torch.where(is_current, rescored, chains.state_log_score[anchor_indices])

        if self.exact:
            proposals = proposals_with_start(
                pairs.in_batch_negative_mask, num_proposals, initial_column, 2 * reencoded.long(), generator
            )
        else:
            proposals = uniform_proposals(pairs.negative_mask, num_proposals, generator)
        sweep = metropolis_hastings_sweep(log_scores, proposals, initial_column, initial_log_score, burn_in, generator)

        # A sample outside the batch (default mode only) is replaced by the softmax over the in-batch negatives.
        in_batch_negatives = F.pad(pairs.in_batch_negative_mask, (0, log_scores.shape[1] - pairs.num_views))
        weights = visit_frequency_weights(sweep.samples, log_scores, in_batch_negatives)
        num_outside = (sweep.samples == OUTSIDE_BATCH).sum(dim=1, dtype=torch.float32)

        # Store one of the two views' chains per image for its next visit.
        keep_second_view = torch.rand(num_images, generator=generator, device=log_scores.device) < 0.5
        kept = torch.arange(num_images, device=log_scores.device) + num_images * keep_second_view.long()
        final_column = sweep.final_column[kept]
        moved = final_column != OUTSIDE_BATCH
        previous_index = chains.state_index[pairs.dataset_indices]
        new_index = torch.where(moved, pairs.candidate_dataset_indices[final_column.clamp(min=0)], previous_index)
        chains.state_index[pairs.dataset_indices] = new_index
        chains.state_log_score[pairs.dataset_indices] = sweep.final_log_score[kept]

        metrics = {
            "acceptance_rate": sweep.num_accepted.sum() / float(sweep.num_accepted.numel() * num_proposals),
            "outside_batch_sample_fraction": num_outside.sum()
            / float(num_outside.numel() * (num_proposals - burn_in)),
        }
        if self.exact:
            metrics["reencoded_fraction"] = reencoded.float().mean()
        return weights, metrics

    @staticmethod
    def _start_on_extra_columns(
        pairs: ViewPairs, stored_index: torch.Tensor, initial_column: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mode: move the start of each anchor whose state is outside the batch onto its re-encoded column.

        Returns the new ``initial_column [2b]`` and ``reencoded: BoolTensor[2b]``, which anchors start on an extra
        column. Raises a ``ValueError`` when a state outside the batch has no extra column.
        """
        reencoded = torch.zeros_like(initial_column, dtype=torch.bool)
        extra_indices = pairs.extra_dataset_indices
        if extra_indices is not None and extra_indices.numel():
            on_extra = stored_index[:, None] == extra_indices[None, :]  # [2b, k]
            reencoded = on_extra.any(dim=1) & (initial_column == OUTSIDE_BATCH)
            extra_column = pairs.num_views + on_extra.long().argmax(dim=1)
            initial_column = torch.where(reencoded, extra_column, initial_column)
        missing = (initial_column == OUTSIDE_BATCH) & (stored_index != EMPTY_STATE)
        if bool(missing.any()):
            raise ValueError(
                f"EMC2Objective(exact=True): the chain states {stored_index[missing].unique().tolist()} are outside "
                "the batch and have no extra_embeddings; encode states_to_encode(dataset_indices) with the current "
                "model and pass them as extra_embeddings / extra_dataset_indices"
            )
        return initial_column, reencoded

    def get_config_dict(self) -> dict[str, float | int | str]:
        return {
            **super().get_config_dict(),
            "num_proposals": "2b-2" if self.num_proposals is None else self.num_proposals,
            "burn_in": "R//2" if self.burn_in is None else self.burn_in,
            **({"exact": True} if self.exact else {}),
        }
