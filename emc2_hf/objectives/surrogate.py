"""The structure every objective shares: a surrogate whose gradient is the stochastic gradient of eq. (11).

For anchors ``a`` with positive ``p(a)`` and detached weights ``w_a`` over candidates,

    surrogate = mean_a [ −β s(a, p(a)) + β Σ_c w_ac s(a, c) ].

Its gradient is ``mean_a [ −β ∇s(a, p(a)) + β Σ_c w_ac ∇s(a, c) ]``, which is eq. (11) when ``w`` are the visit
frequencies of the EMC² chains, the in-batch softmax for InfoNCE, and ``exp(β s)/u`` for SogCLR. Objectives differ
only in :meth:`ContrastiveObjective.negative_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..sampling.random import keyed_generator
from .problem import ContrastiveProblem, two_view_problem


def surrogate_loss(
    similarities: torch.Tensor,
    positive_columns: torch.Tensor,
    weights: torch.Tensor,
    inverse_temperature: float | torch.Tensor,
) -> torch.Tensor:
    """``mean_a [−β s(a, p(a)) + β Σ_c w_ac s(a, c)]`` with ``w`` detached.

    Args:
        similarities: ``FloatTensor[A, C]``.
        positive_columns: ``LongTensor[A]``.
        weights: ``FloatTensor[A, C]``, zero outside each anchor's candidates.
        inverse_temperature: ``β``, a float or a 0-dim tensor (a learned scale gets the gradient
            ``mean_a [Σ_c w_ac s(a, c) − s(a, p(a))]``, eq. (11)'s derivative in ``β``).
    """
    positive = similarities.gather(1, positive_columns[:, None]).squeeze(1)
    negative = (weights.detach() * similarities).sum(dim=1)
    return inverse_temperature * (negative - positive).mean()


def info_nce_loss(
    similarities: torch.Tensor,
    positive_columns: torch.Tensor,
    inverse_temperature: float | torch.Tensor,
    denominator_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE (eq. (2)): ``mean_a [−β s(a, p(a)) + log Σ_{c ∈ D(a)} exp(β s(a, c))]``.

    Args:
        similarities: ``FloatTensor[A, C]``.
        positive_columns: ``LongTensor[A]``.
        inverse_temperature: ``β`` (float or 0-dim tensor).
        denominator_mask: ``BoolTensor[A, C]``, the columns ``D(a)`` of each anchor's denominator (negatives and
            positive). Default: every column but the diagonal — SimCLR's NT-Xent over ``[2b, 2b]`` view similarities.
    """
    logits = inverse_temperature * similarities.float()
    if denominator_mask is None:
        denominator_mask = ~torch.eye(logits.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
    return F.cross_entropy(logits.masked_fill(~denominator_mask, float("-inf")), positive_columns)


@dataclass
class ObjectiveOutput:
    """Result of one objective evaluation.

    Attributes:
        loss: scalar whose **gradient** is the objective's stochastic gradient (eq. (11)) and whose **value** is the
            batch's InfoNCE (NT-Xent), the same quantity for every objective so training curves compare across
            objectives.
        metrics: detached scalars to log (e.g. EMC²'s acceptance rate).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class ContrastiveObjective(nn.Module):
    """Base class: takes a :class:`ContrastiveProblem`, asks the subclass for negative weights, returns the surrogate.

    Subclasses implement :meth:`negative_weights` and set ``name``, ``title`` and ``citation``. Per-sample state (if
    any) lives in buffers, so it follows ``.to(device)`` and is saved by ``state_dict()``.

    Args:
        inverse_temperature: ``β > 0`` (``1/τ``; the paper uses 14.28 at b = 32 and 5 at b = 256 on STL-10).
        seed: key of the random numbers; step ``t`` draws from a generator seeded by ``(seed, name, t, micro_step)``.
    """

    name: ClassVar[str] = "contrastive"
    title: ClassVar[str] = "contrastive objective"
    """How the model card names the objective."""
    citation: ClassVar[str] = ""
    training_arguments: ClassVar[dict[str, str]] = {}
    """Each constructor option's :class:`~emc2_hf.ContrastiveTrainingArguments` field (its recipe flag ``--field``)."""
    reencodes_chain_states: ClassVar[bool] = False
    reencodes_cache_negatives: ClassVar[bool] = False
    """Whether the caller must draw negatives from the objective's cache and encode them (the negative cache)."""
    """Whether the caller must encode the chain states the batch does not contain (EMC²)."""
    stream: str | None = None
    """An extra key of the random numbers (e.g. the direction of an image–text objective), so two instances with
    one seed draw independent numbers."""

    def __init__(self, inverse_temperature: float, seed: int = 0) -> None:
        super().__init__()
        if not inverse_temperature > 0:
            raise ValueError(f"inverse_temperature must be > 0 (it is 1/τ), got {inverse_temperature}")
        self.inverse_temperature = float(inverse_temperature)
        self.seed = int(seed)

    def scale(self, problem: ContrastiveProblem) -> float | torch.Tensor:
        """``β`` of ``problem``: its own (a float or a learned tensor, with autograd), else the objective's."""
        return self.inverse_temperature if problem.inverse_temperature is None else problem.inverse_temperature

    def log_score_scale(self, problem: ContrastiveProblem) -> float | torch.Tensor:
        """The current, detached ``β`` that negative weights and chain acceptances use (``log score = β s``)."""
        scale = self.scale(problem)
        return scale.detach().float() if isinstance(scale, torch.Tensor) else scale

    def negative_weights(
        self, problem: ContrastiveProblem, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return detached weights ``FloatTensor[A, C]`` over each anchor's candidates and metrics to log."""
        raise NotImplementedError

    def validate_batch_size(self, num_images: int) -> None:
        """Raise a ``ValueError`` naming the fix if a global batch of ``num_images`` images cannot be trained on."""
        if num_images < 2:
            raise ValueError(
                f"a global batch of {num_images} image leaves its anchors without negatives; contrastive training "
                "needs at least 2 images per batch"
            )

    def forward(
        self,
        problem: ContrastiveProblem | torch.Tensor,
        dataset_indices: torch.Tensor | None = None,
        step: int = 0,
        micro_step: int = 0,
        **two_view_arguments: Any,
    ) -> ObjectiveOutput:
        """Evaluate the objective on a problem, or on ``embeddings: [2b, d]`` (view 1 of each image, then view 2).

        Args:
            problem: a :class:`ContrastiveProblem`, or the projected features of the ``2b`` views (any float dtype),
                turned into one by :func:`~emc2_hf.objectives.two_view_problem` with ``dataset_indices`` and
                ``two_view_arguments`` (view keys, state columns).
            dataset_indices: ``LongTensor[b]``, dataset index of each image (with embeddings).
            step: global optimisation step (keys the random numbers).
            micro_step: index of the micro-batch within a step under gradient accumulation.
        """
        if not isinstance(problem, ContrastiveProblem):
            if dataset_indices is None:
                raise ValueError("pass dataset_indices with the embeddings (or a ContrastiveProblem)")
            problem = two_view_problem(problem, dataset_indices, **two_view_arguments)
        elif dataset_indices is not None or two_view_arguments:
            raise ValueError("a ContrastiveProblem carries its own keys; pass no dataset_indices or view arguments")
        keys = (self.seed, self.name) if self.stream is None else (self.seed, self.name, self.stream)
        generator = keyed_generator(*keys, step, micro_step, device=problem.similarities.device)
        weights, metrics = self.negative_weights(problem, generator)
        scale = self.scale(problem)
        surrogate = surrogate_loss(problem.similarities, problem.positive_columns, weights, scale)
        with torch.no_grad():
            reported = info_nce_loss(
                problem.batch_similarities,
                problem.positive_columns,
                self.log_score_scale(problem),
                problem.info_nce_mask,
            )
        if problem.num_duplicates_dropped:
            metrics["duplicate_images_dropped"] = torch.tensor(float(problem.num_duplicates_dropped))
        return ObjectiveOutput(loss=surrogate + (reported - surrogate).detach(), metrics=metrics)

    def get_config_dict(self) -> dict[str, float | int | str]:
        return {"objective": self.name, "inverse_temperature": self.inverse_temperature}

    def card_settings(self, global_batch_size: int) -> dict[str, float | int | str]:
        """The hyper-parameters as numbers for a global batch of ``global_batch_size`` images (for the model card)."""
        return {key: value for key, value in self.get_config_dict().items() if key != "objective"}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.get_config_dict().items() if key != "objective")
