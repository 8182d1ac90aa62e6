"""Per-sample state kept across steps, one entry per training example (O(m) memory), and its checkpointing.

* :class:`MarkovChainState`: EMC²'s chain per dataset index: the dataset index of the chain's current negative and
  its log-score ``β·s`` (12 bytes per example).
* :class:`MovingAverageState`: SogCLR's moving average ``u`` per dataset index, kept as ``log u`` (5 bytes per
  example) so it never overflows.

Both are ``nn.Module`` buffers: they follow the objective to the features' device and appear in its
``state_dict()``, which :func:`save_per_sample_state` writes as safetensors into every checkpoint.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PER_SAMPLE_STATE_NAME = "per_sample_state.safetensors"
EMPTY_STATE = -1
"""``state_index`` of a chain that has not accepted a negative yet."""


class MarkovChainState(nn.Module):
    """One Metropolis–Hastings chain per training example.

    Buffers:
        state_index: ``LongTensor[m]``, dataset index of the chain's current negative (``EMPTY_STATE`` before the
            first acceptance).
        state_log_score: ``FloatTensor[m]``, ``β·s(anchor, state)`` when the state was last scored (``-inf`` when
            empty).
    """

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.register_buffer("state_index", torch.full((num_samples,), EMPTY_STATE, dtype=torch.long))
        self.register_buffer("state_log_score", torch.full((num_samples,), float("-inf"), dtype=torch.float32))

    @property
    def num_samples(self) -> int:
        return self.state_index.numel()


class MovingAverageState(nn.Module):
    """SogCLR's moving average of ``mean_k exp(β s_k)``, one per training example, stored as its logarithm.

    Buffers:
        log_u: ``FloatTensor[m]``, ``log u_i``.
        initialised: ``BoolTensor[m]``, whether ``u_i`` has received its first estimate.
    """

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.register_buffer("log_u", torch.zeros(num_samples, dtype=torch.float32))
        self.register_buffer("initialised", torch.zeros(num_samples, dtype=torch.bool))

    @property
    def num_samples(self) -> int:
        return self.log_u.numel()

    @property
    def u(self) -> torch.Tensor:
        """``FloatTensor[m]``, ``u`` itself (may overflow to ``inf`` for large β; use ``log_u`` for arithmetic)."""
        return self.log_u.exp()


def save_per_sample_state(module: nn.Module, directory: str | os.PathLike) -> str | None:
    """Write ``module``'s buffers to ``directory/per_sample_state.safetensors``; returns the path (None if empty)."""
    tensors = {name: buffer.detach().cpu().contiguous() for name, buffer in module.named_buffers()}
    if not tensors:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PER_SAMPLE_STATE_NAME)
    save_file(tensors, path, metadata={"format": "pt", "module": type(module).__name__})
    return path


def load_per_sample_state(module: nn.Module, directory: str | os.PathLike) -> bool:
    """Restore ``module``'s buffers from a checkpoint written by :func:`save_per_sample_state`.

    Returns False when the module has no buffers. Raises a ``ValueError`` naming the mismatch when the checkpoint was
    written for another objective or another dataset size, and ``FileNotFoundError`` when the file is missing.
    """
    expected = dict(module.named_buffers())
    if not expected:
        return False
    path = os.path.join(directory, PER_SAMPLE_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: this checkpoint holds no per-sample state for {type(module).__name__}. It was written "
            "by another objective or by a plain Trainer; resume with the objective that wrote it."
        )
    saved = load_file(path)
    if set(saved) != set(expected):
        raise ValueError(
            f"{path} holds per-sample state {sorted(saved)} but {type(module).__name__} expects {sorted(expected)}: "
            "the checkpoint was written with another objective."
        )
    for name, buffer in expected.items():
        if saved[name].shape != buffer.shape:
            raise ValueError(
                f"{path}: '{name}' has {tuple(saved[name].shape)} entries but the training set has "
                f"{tuple(buffer.shape)}: a checkpoint resumes only on the training set it was written for."
            )
        buffer.copy_(saved[name].to(buffer.device))
    return True
