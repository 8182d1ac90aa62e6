"""The per-sample states' read/write interface: round trips, untouched rows, sizes measured from the buffers, and the
buffer names and shapes that checkpoints are written under."""

from __future__ import annotations

import pytest
import torch

from emc2_hf.objectives import build_image_text_objective, build_objective
from emc2_hf.sampling.sample_state import (
    EMPTY_STATE,
    MarkovChainState,
    MovingAverageState,
    PerSampleState,
    load_per_sample_state,
    save_per_sample_state,
)

NUM_SAMPLES = 50


def _buffer_bytes(module: torch.nn.Module) -> int:
    return sum(buffer.numel() * buffer.element_size() for buffer in module.buffers())


def test_both_states_offer_the_interface_and_the_base_cannot_be_built():
    assert isinstance(MarkovChainState(NUM_SAMPLES), PerSampleState)
    assert isinstance(MovingAverageState(NUM_SAMPLES), PerSampleState)
    with pytest.raises(TypeError):
        PerSampleState()


@pytest.mark.parametrize("num_slots", [1, 2, 5])
def test_chain_state_round_trips_and_leaves_other_chains_alone(num_slots):
    chains = MarkovChainState(NUM_SAMPLES, num_slots)
    generator = torch.Generator().manual_seed(num_slots)
    keys = torch.randperm(NUM_SAMPLES, generator=generator)[:12]  # distinct (key, slot) pairs
    slots = torch.randint(num_slots, (12,), generator=generator)
    index = torch.randint(NUM_SAMPLES, (12,), generator=generator)
    view = torch.randint(2**62, (12,), generator=generator)  # view keys are 63-bit seeds
    similarity = torch.rand(12, generator=generator, dtype=torch.float64) * 2 - 1
    chains.write(keys, slots, index, view, similarity)

    read_index, read_view, read_similarity = chains.read(keys, slots)
    assert torch.equal(read_index, index) and torch.equal(read_view, view)
    assert read_similarity.dtype == torch.float32 and torch.equal(read_similarity, similarity.float())
    written = torch.zeros(NUM_SAMPLES, num_slots, dtype=torch.bool)
    written[keys, slots] = True
    assert bool((chains.state_index[~written] == EMPTY_STATE).all())
    assert bool((chains.state_view[~written] == EMPTY_STATE).all())
    assert bool(torch.isneginf(chains.state_similarity[~written]).all())
    with pytest.raises(ValueError, match="state slot"):
        chains.read(keys[:1], torch.tensor([num_slots]))


def test_moving_average_round_trips_and_marks_written_rows_initialised():
    state = MovingAverageState(NUM_SAMPLES)
    keys = torch.tensor([3, 17, 42, 0])
    log_u = torch.tensor([0.5, -2.0, 60.0, 1e-3], dtype=torch.float64)
    state.write(keys, log_u)
    read_log_u, initialised = state.read(keys)
    assert read_log_u.dtype == torch.float32 and torch.equal(read_log_u, log_u.float())
    assert bool(initialised.all())
    others = torch.ones(NUM_SAMPLES, dtype=torch.bool)
    others[keys] = False
    assert not bool(state.initialised[others].any()) and bool((state.log_u[others] == 0).all())

    state.write(keys[:2], torch.zeros(2), initialised=torch.tensor([False, True]))
    assert state.read(keys[:2])[1].tolist() == [False, True]
    assert torch.allclose(state.u[keys[2:]], log_u[2:].float().exp())


@pytest.mark.parametrize(
    "state, expected",
    [
        (MarkovChainState(NUM_SAMPLES, 2), 2 * (8 + 8 + 4)),
        (MarkovChainState(NUM_SAMPLES, 6), 6 * (8 + 8 + 4)),
        (MovingAverageState(NUM_SAMPLES), 4 + 1),
    ],
)
def test_bytes_per_example_is_the_buffers_bytes_over_m(state, expected):
    assert state.num_samples == NUM_SAMPLES
    assert state.bytes_per_example == expected
    assert state.bytes_per_example == _buffer_bytes(state) / NUM_SAMPLES == state.nbytes / NUM_SAMPLES


def test_objectives_state_bytes_per_example_match_their_modules():
    emc2 = build_objective("emc2", NUM_SAMPLES, 5.0)
    assert emc2.chains.bytes_per_example * NUM_SAMPLES == _buffer_bytes(emc2) == 40 * NUM_SAMPLES
    sogclr = build_objective("sogclr", NUM_SAMPLES, 5.0)
    assert sogclr.moving_average.bytes_per_example * NUM_SAMPLES == _buffer_bytes(sogclr) == 5 * NUM_SAMPLES
    image_text = build_image_text_objective("emc2", NUM_SAMPLES, 5.0, captions_per_pair=5)
    assert _buffer_bytes(image_text) == 20 * (1 + 5) * NUM_SAMPLES


def test_buffer_names_and_shapes_are_those_checkpoints_hold(tmp_path):
    chains, average = MarkovChainState(NUM_SAMPLES, 3), MovingAverageState(NUM_SAMPLES)
    assert {name: tuple(t.shape) for name, t in chains.state_dict().items()} == {
        "state_index": (NUM_SAMPLES, 3),
        "state_view": (NUM_SAMPLES, 3),
        "state_similarity": (NUM_SAMPLES, 3),
    }
    assert {name: tuple(t.shape) for name, t in average.state_dict().items()} == {
        "log_u": (NUM_SAMPLES,),
        "initialised": (NUM_SAMPLES,),
    }
    average.write(torch.tensor([1, 2]), torch.tensor([0.25, 4.0]))
    save_per_sample_state(average, tmp_path)
    restored = MovingAverageState(NUM_SAMPLES)
    assert load_per_sample_state(restored, tmp_path)
    rows = torch.arange(4)
    assert all(torch.equal(a, b) for a, b in zip(restored.read(rows), average.read(rows), strict=True))
