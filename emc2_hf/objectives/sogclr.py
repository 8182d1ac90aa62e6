"""SogCLR: a moving-average estimate of each anchor's normaliser (Yuan et al., 2022)."""

from __future__ import annotations

import math

import torch

from ..sampling.sample_state import MovingAverageState
from .surrogate import ContrastiveObjective
from .views import ViewPairs


class SogCLRObjective(ContrastiveObjective):
    """Global contrastive loss with ``u_i ≈ mean_{z ∈ D_neg(i)} exp(β s(i, z))`` tracked per dataset index.

    For an anchor view of image ``i`` with in-batch negatives ``k = 1 … K`` (``K = 2b − 2``)::

        u_i ← (1 − γ) u_i + γ · (1/K) Σ_k exp(β s_k)      (first visit: u_i ← (1/K) Σ_k exp(β s_k))
        w_k = exp(β s_k) / (K · u_i)

    so ``Σ_k w_k = 1`` when ``u_i`` equals the batch's mean. Everything runs in log-space (``log u`` is stored and
    ``w_k = exp(β s_k − log u_i − log K)``), so no intermediate overflows for β up to 50 and beyond. Both views of an
    image update ``u_i`` from its previous value; the stored value is their mean (as in SogCLR's reference code).

    Args:
        num_samples: ``m``, the training-set size (one ``u`` per example).
        inverse_temperature: ``β``.
        gamma: ``γ ∈ (0, 1]``, the moving-average weight of the new estimate (SogCLR's default 0.9).
        seed: unused (SogCLR draws no random numbers); kept for a uniform constructor.
    """

    name = "sogclr"
    citation = (
        "@inproceedings{yuan2022sogclr,\n  title={Provable Stochastic Optimization for Global Contrastive Learning: "
        "Small Batch Does Not Harm Performance},\n  author={Yuan, Zhuoning and Wu, Yuexin and Qiu, Zi-Hao and Du, "
        "Xianzhi and Zhang, Lijun and Zhou, Denny and Yang, Tianbao},\n  booktitle={ICML},\n  year={2022}\n}"
    )

    def __init__(self, num_samples: int, inverse_temperature: float, gamma: float = 0.9, seed: int = 0) -> None:
        super().__init__(inverse_temperature, seed)
        if not 0 < gamma <= 1:
            raise ValueError(f"sogclr_gamma must be in (0, 1], got {gamma}")
        self.gamma = float(gamma)
        self.moving_average = MovingAverageState(num_samples)

    def negative_weights(
        self, pairs: ViewPairs, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        state = self.moving_average
        log_scores = self.inverse_temperature * pairs.similarities.detach()
        negative_log_scores = log_scores.masked_fill(~pairs.negative_mask, float("-inf"))
        log_num_negatives = math.log(int(pairs.negative_mask[0].sum()))
        log_batch_mean = torch.logsumexp(negative_log_scores, dim=1) - log_num_negatives  # [2b]

        anchor_indices = pairs.anchor_dataset_indices
        previous = state.log_u[anchor_indices]
        if self.gamma < 1.0:
            blended = torch.logaddexp(previous + math.log1p(-self.gamma), log_batch_mean + math.log(self.gamma))
        else:
            blended = log_batch_mean
        log_u = torch.where(state.initialised[anchor_indices], blended, log_batch_mean)  # [2b]

        weights = (negative_log_scores - log_u[:, None] - log_num_negatives).exp()
        num_images = pairs.num_images
        state.log_u[pairs.dataset_indices] = torch.logaddexp(log_u[:num_images], log_u[num_images:]) - math.log(2.0)
        state.initialised[pairs.dataset_indices] = True
        return weights, {"negative_weight_sum": weights.sum(dim=1).mean()}

    def get_config_dict(self) -> dict[str, float | int | str]:
        return {**super().get_config_dict(), "gamma": self.gamma}
