"""Decoupled InfoNCE: the softmax over the in-batch negatives only (Yeh et al., 2022)."""

from __future__ import annotations

import torch

from .problem import ContrastiveProblem
from .simclr import _pad_columns
from .surrogate import ContrastiveObjective


class DecoupledInfoNCEObjective(ContrastiveObjective):
    """InfoNCE without the positive in the denominator: ``w_ac = softmax_{c ∈ neg(a)}(β s_ac)``.

    The surrogate is the gradient of ``mean_a [−β s_ap + log Σ_{c ∈ neg(a)} exp(β s_ac)]`` over the batch (DCL,
    Yeh et al. 2022). It is also the estimate of eq. (11) that replaces every chain sample by the softmax restricted to
    the batch — what EMC²'s cheap in-batch variant (``emc2_in_batch``) approximates with sampling noise — so a gain of
    EMC² over SimCLR can be told apart from the gain of dropping the positive. Keeps no per-sample state.

    Inputs: a :class:`~emc2_hf.objectives.ContrastiveProblem` (or ``embeddings [2b, d]``, ``dataset_indices [b]``).
    Relations: :class:`~emc2_hf.objectives.SimCLRObjective` keeps the positive; both are biased estimates of the
    global loss (1) for small batches.
    """

    name = "dcl"
    title = "Decoupled InfoNCE (in-batch negatives only)"
    citation = (
        "@inproceedings{yeh2022dcl,\n  title={Decoupled Contrastive Learning},\n  author={Yeh, Chun-Hsiao and Hong, "
        "Cheng-Yao and Hsu, Yen-Chi and Liu, Tyng-Luh and Chen, Yubei and LeCun, Yann},\n  booktitle={ECCV},\n"
        "  year={2022}\n}"
    )

    def negative_weights(
        self, problem: ContrastiveProblem, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.log_score_scale(problem) * problem.batch_similarities.detach()
        weights = logits.masked_fill(~problem.batch_negative_mask, float("-inf")).softmax(dim=1)
        return _pad_columns(weights, problem), {}
