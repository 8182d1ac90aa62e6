"""SimCLR's InfoNCE / NT-Xent over the candidates of a batch (Chen et al., 2020)."""

from __future__ import annotations

import torch

from .problem import ContrastiveProblem
from .surrogate import ContrastiveObjective


class SimCLRObjective(ContrastiveObjective):
    """InfoNCE with in-batch candidates: weights ``w_ac = softmax_{c ∈ neg(a) ∪ {p(a)}}(β s_ac)``, positive included.

    The surrogate's gradient equals the gradient of NT-Xent exactly: ``∇[−β s_ap + log Σ_c exp(β s_ac)]
    = −β ∇s_ap + β Σ_c softmax(β s_a·)_c ∇s_ac`` over the ``2b − 1`` other views of the batch. Keeps no per-sample
    state.

    Inputs: a :class:`~emc2_hf.objectives.ContrastiveProblem` (or ``embeddings [2b, d]``, ``dataset_indices [b]``).
    Relations: the in-batch approximation of the global loss (1), biased for small batches (eq. (3)); EMC² and SogCLR
    target (1) itself; :class:`~emc2_hf.objectives.DecoupledInfoNCEObjective` drops the positive from the
    denominator.
    """

    name = "simclr"
    title = "SimCLR (InfoNCE)"
    citation = (
        "@inproceedings{chen2020simclr,\n  title={A Simple Framework for Contrastive Learning of Visual "
        "Representations},"
        "\n  author={Chen, Ting and Kornblith, Simon and Norouzi, Mohammad and Hinton, Geoffrey},\n"
        "  booktitle={ICML},\n  year={2020}\n}"
    )

    def negative_weights(
        self, problem: ContrastiveProblem, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.log_score_scale(problem) * problem.batch_similarities.detach()
        weights = logits.masked_fill(~problem.info_nce_mask, float("-inf")).softmax(dim=1)
        return _pad_columns(weights, problem), {}


def _pad_columns(weights: torch.Tensor, problem: ContrastiveProblem) -> torch.Tensor:
    """Weights over the batch's columns, padded with zeros over the state columns (``[A, C]``)."""
    extra = problem.similarities.shape[1] - problem.num_batch_columns
    return torch.nn.functional.pad(weights, (0, extra)) if extra else weights
