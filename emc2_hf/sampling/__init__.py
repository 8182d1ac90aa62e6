"""Negative sampling: the Metropolis–Hastings sweep, per-sample state and keyed random numbers."""

from .metropolis_hastings import (
    OUTSIDE_BATCH,
    SweepResult,
    metropolis_hastings_sweep,
    one_candidate_per_example,
    uniform_proposals,
    uniform_proposals_from_lists,
)
from .random import chain_selection, keyed_generator, keyed_seed, keyed_transform
from .sample_state import (
    EMPTY_STATE,
    PER_SAMPLE_STATE_NAME,
    ChainStateTable,
    MarkovChainState,
    MovingAverageState,
    PerSampleState,
    load_per_sample_state,
    save_per_sample_state,
)

__all__ = [
    "EMPTY_STATE",
    "OUTSIDE_BATCH",
    "PER_SAMPLE_STATE_NAME",
    "ChainStateTable",
    "MarkovChainState",
    "MovingAverageState",
    "PerSampleState",
    "SweepResult",
    "chain_selection",
    "keyed_generator",
    "keyed_seed",
    "keyed_transform",
    "load_per_sample_state",
    "metropolis_hastings_sweep",
    "one_candidate_per_example",
    "save_per_sample_state",
    "uniform_proposals",
    "uniform_proposals_from_lists",
]
