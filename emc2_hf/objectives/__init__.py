"""Contrastive objectives: one module each, sharing the surrogate of eq. (11)."""

from __future__ import annotations

from .emc2 import EMC2Objective, visit_frequency_weights
from .global_loss import global_contrastive_loss
from .simclr import SimCLRObjective
from .sogclr import SogCLRObjective
from .surrogate import ContrastiveObjective, ObjectiveOutput, info_nce_loss, surrogate_loss
from .views import ViewPairs, pair_views

OBJECTIVES: dict[str, type[ContrastiveObjective]] = {
    "emc2": EMC2Objective,
    "simclr": SimCLRObjective,
    "sogclr": SogCLRObjective,
}


def build_objective(
    name: str,
    num_samples: int,
    inverse_temperature: float,
    *,
    num_proposals: int | None = None,
    burn_in: int | None = None,
    sogclr_gamma: float = 0.9,
    seed: int = 0,
    exact: bool = False,
) -> ContrastiveObjective:
    """Construct the objective called ``name`` ("emc2", "simclr" or "sogclr") for a training set of ``num_samples``.

    ``exact`` selects EMC²'s exact mode (re-encoded chain states); it is refused for the other objectives.
    """
    if exact and name != "emc2":
        raise ValueError(f"exact mode (re-encoded chain states) exists for the emc2 objective only, not {name!r}")
    if name == "emc2":
        return EMC2Objective(
            num_samples, inverse_temperature, num_proposals=num_proposals, burn_in=burn_in, seed=seed, exact=exact
        )
    if name == "sogclr":
        return SogCLRObjective(num_samples, inverse_temperature, gamma=sogclr_gamma, seed=seed)
    if name == "simclr":
        return SimCLRObjective(inverse_temperature, seed=seed)
    raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")


__all__ = [
    "OBJECTIVES",
    "ContrastiveObjective",
    "EMC2Objective",
    "ObjectiveOutput",
    "SimCLRObjective",
    "SogCLRObjective",
    "ViewPairs",
    "build_objective",
    "global_contrastive_loss",
    "info_nce_loss",
    "pair_views",
    "surrogate_loss",
    "visit_frequency_weights",
]
