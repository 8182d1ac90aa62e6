"""The structure every objective shares: a surrogate whose gradient is the stochastic gradient of eq. (11).

For anchors ``a`` with positive ``p(a)`` and detached weights ``w_a`` over candidates,

    surrogate = mean_a [ −β s(a, p(a)) + β Σ_c w_ac s(a, c) ].

Its gradient is ``mean_a [ −β ∇s(a, p(a)) + β Σ_c w_ac ∇s(a, c) ]``, which is eq. (11) when ``w`` are the visit
frequencies of the EMC² chains, the in-batch softmax for InfoNCE, and ``exp(β s)/u`` for SogCLR. Objectives differ
only in :meth:`ContrastiveObjective.negative_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..sampling.random import keyed_generator
from .views import ViewPairs, pair_views


def surrogate_loss(
    similarities: torch.Tensor,
    positive_columns: torch.Tensor,
    weights: torch.Tensor,
    inverse_temperature: float,
) -> torch.Tensor:
    """``mean_a [−β s(a, p(a)) + β Σ_c w_ac s(a, c)]`` with ``w`` detached.

    Args:
        similarities: ``FloatTensor[A, C]``.
        positive_columns: ``LongTensor[A]``.
        weights: ``FloatTensor[A, C]``, zero outside each anchor's candidates.
        inverse_temperature: ``β``.
    """
    positive = similarities.gather(1, positive_columns[:, None]).squeeze(1)
    negative = (weights.detach() * similarities).sum(dim=1)
    return inverse_temperature * (negative - positive).mean()


def info_nce_loss(
    similarities: torch.Tensor, positive_columns: torch.Tensor, inverse_temperature: float
) -> torch.Tensor:
    """NT-Xent (SimCLR's InfoNCE, eq. (2)): ``mean_a [−β s(a, p(a)) + log Σ_{c ≠ a} exp(β s(a, c))]``.

    ``similarities`` is ``[2b, 2b]`` over the views themselves, so the diagonal (self) is excluded.
    """
    logits = inverse_temperature * similarities.float()
    self_mask = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    return F.cross_entropy(logits.masked_fill(self_mask, float("-inf")), positive_columns)


@dataclass
class ObjectiveOutput:
    """Result of one objective evaluation.

    Attributes:
        loss: scalar whose **gradient** is the objective's stochastic gradient (eq. (11)) and whose **value** is the
            batch's NT-Xent, the same quantity for every objective so training curves compare across objectives.
        metrics: detached scalars to log (e.g. EMC²'s acceptance rate).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class ContrastiveObjective(nn.Module):
    """Base class: pairs the views, asks the subclass for negative weights, returns the surrogate.

    Subclasses implement :meth:`negative_weights` and set ``name`` and ``citation``. Per-sample state (if any) lives in
    buffers, so it follows ``.to(device)`` and is saved by ``state_dict()``.

    Args:
        inverse_temperature: ``β > 0`` (``1/τ``; the paper uses 14.28 at b = 32 and 5 at b = 256 on STL-10).
        seed: key of the random numbers; step ``t`` draws from a generator seeded by ``(seed, name, t, micro_step)``.
    """

    name: str = "contrastive"
    citation: str = ""
    accepts_extra_candidates: bool = False
    """Whether :meth:`forward` takes ``extra_embeddings`` (only EMC²'s exact mode uses them)."""

    def __init__(self, inverse_temperature: float, seed: int = 0) -> None:
        super().__init__()
        if not inverse_temperature > 0:
            raise ValueError(f"inverse_temperature must be > 0 (it is 1/τ), got {inverse_temperature}")
        self.inverse_temperature = float(inverse_temperature)
        self.seed = int(seed)

    def negative_weights(
        self, pairs: ViewPairs, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return detached weights ``FloatTensor[2b, 2b + k]`` over each anchor's candidates and metrics to log."""
        raise NotImplementedError

    def forward(
        self,
        embeddings: torch.Tensor,
        dataset_indices: torch.Tensor,
        step: int = 0,
        micro_step: int = 0,
        extra_embeddings: torch.Tensor | None = None,
        extra_dataset_indices: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Evaluate the objective on ``embeddings: [2b, d]`` (view 1 of each image, then view 2).

        Args:
            embeddings: projected features of the ``2b`` views, any float dtype.
            dataset_indices: ``LongTensor[b]``, dataset index of each image.
            step: global optimisation step (keys the random numbers).
            micro_step: index of the micro-batch within a step under gradient accumulation.
            extra_embeddings: optional ``[k, d]``, more candidates (other training images) appended after the views;
                only objectives with ``accepts_extra_candidates`` take them (EMC²'s exact mode).
            extra_dataset_indices: ``LongTensor[k]``, the dataset indices of ``extra_embeddings``.
        """
        if extra_embeddings is not None and not self.accepts_extra_candidates:
            raise ValueError(
                f"the {self.name} objective takes no extra_embeddings (only EMC2Objective(exact=True) does)"
            )
        pairs = pair_views(embeddings, dataset_indices, extra_embeddings, extra_dataset_indices)
        generator = keyed_generator(self.seed, self.name, step, micro_step, device=embeddings.device)
        weights, metrics = self.negative_weights(pairs, generator)
        surrogate = surrogate_loss(pairs.similarities, pairs.positive_columns, weights, self.inverse_temperature)
        with torch.no_grad():
            in_batch = pairs.similarities[:, : pairs.num_views]
            reported = info_nce_loss(in_batch, pairs.positive_columns, self.inverse_temperature)
        return ObjectiveOutput(loss=surrogate + (reported - surrogate).detach(), metrics=metrics)

    def get_config_dict(self) -> dict[str, float | int | str]:
        return {"objective": self.name, "inverse_temperature": self.inverse_temperature}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.get_config_dict().items() if key != "objective")
