"""SimCLR's InfoNCE / NT-Xent over the ``2b`` views of a batch (Chen et al., 2020)."""

from __future__ import annotations

import torch

from .surrogate import ContrastiveObjective
from .views import ViewPairs


class SimCLRObjective(ContrastiveObjective):
    """InfoNCE with in-batch candidates: weights ``w_ac = softmax_{c ≠ a}(β s_ac)``, positive included.

    The surrogate's gradient equals the gradient of NT-Xent exactly: ``∇[−β s_ap + log Σ_{c≠a} exp(β s_ac)]
    = −β ∇s_ap + β Σ_{c≠a} softmax(β s_a·)_c ∇s_ac``. Keeps no per-sample state.

    Inputs: ``embeddings [2b, d]``, ``dataset_indices [b]`` (unused). Relations: the in-batch approximation of the
    global
    loss (1), biased for small batches (eq. (3)); EMC² and SogCLR target (1) itself.
    """

    name = "simclr"
    citation = (
        "@inproceedings{chen2020simclr,\n  title={A Simple Framework for Contrastive Learning of Visual "
        "Representations},"
        "\n  author={Chen, Ting and Kornblith, Simon and Norouzi, Mohammad and Hinton, Geoffrey},\n"
        "  booktitle={ICML},\n  year={2020}\n}"
    )

    def negative_weights(
        self, pairs: ViewPairs, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.inverse_temperature * pairs.similarities.detach()
        return logits.masked_fill(pairs.self_mask, float("-inf")).softmax(dim=1), {}
