"""Per-sample state kept across steps, one entry per training example (O(m) memory), and its checkpointing.

* :class:`PerSampleState`: the read/write interface every per-sample state offers — ``read(keys, ...)`` the rows of
  some examples, ``write(keys, ..., values)`` them back, ``num_samples`` (``m``) and ``bytes_per_example`` (the
  bytes of one row of every ``[m, ...]`` buffer) — so that code that moves, shards or exchanges state rows needs
  no knowledge of the buffers.
* :class:`MarkovChainState`: EMC²'s chains, ``V`` per dataset index (one per view slot of the example): the dataset
  index of the chain's current negative, the view key that re-creates exactly that negative, and its similarity
  ``s`` when last scored (20 bytes per chain, ``20 V`` per example).
* :class:`MovingAverageState`: SogCLR's moving average ``u`` per dataset index, kept as ``log u`` (5 bytes per
  example) so it never overflows.
* :class:`ChainStateTable`: a CPU shared-memory copy of the chains' states that DataLoader workers read, so the
  collator can deliver each batch's chain-state images with the batch.

Both states are ``nn.Module`` buffers: they follow the objective to the features' device and appear in its
``state_dict()``, which :func:`save_per_sample_state` writes as safetensors into every checkpoint. The state is
global (indexed by dataset index, not by process): every process holds all ``m`` rows and applies the same update
from the gathered global batch, so a checkpoint resumes under any number of processes (``docs/scaling.md``).
"""

from __future__ import annotations

import os
from abc import ABCMeta, abstractmethod

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

PER_SAMPLE_STATE_NAME = "per_sample_state.safetensors"
EMPTY_STATE = -1
"""``state_index`` of a chain that has not accepted a negative yet."""


class PerSampleState(nn.Module, metaclass=ABCMeta):
    """The read/write interface of a per-sample state: ``m`` rows, one per training example, keyed by dataset index.

    A subclass keeps its rows in buffers whose first dimension is ``m`` (``[m]`` or ``[m, V]``), so they follow
    ``.to(device)`` and go into ``state_dict()`` (hence into checkpoints) under their own names; 0-dim buffers
    (e.g. a position counter) are not rows. :meth:`read` and :meth:`write` are the only access the interface
    promises: what a row holds is the subclass's business.

    ``write`` with a key (or ``(key, slot)``) given twice keeps one of its values (which one is unspecified, as for
    any indexed assignment): reduce repeated keys first.
    """

    @property
    @abstractmethod
    def num_samples(self) -> int:
        """``m``, the number of rows (training examples)."""

    @property
    def bytes_per_example(self) -> int:
        """Bytes of one row: ``Σ element_size · numel / m`` over the ``[m, ...]`` buffers (0-dim buffers excluded)."""
        return sum(
            buffer.element_size() * (buffer.numel() // buffer.shape[0]) for buffer in self.buffers() if buffer.ndim
        )

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer together (``≈ m · bytes_per_example``)."""
        return sum(buffer.element_size() * buffer.numel() for buffer in self.buffers())

    @abstractmethod
    def read(self, keys: torch.Tensor, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rows of the examples ``keys [k]`` (further index tensors, e.g. slots, as the subclass defines)."""

    @abstractmethod
    def write(self, keys: torch.Tensor, *args: torch.Tensor) -> None:
        """Set the rows of the examples ``keys [k]`` to the given values (the order of :meth:`read`'s outputs)."""


class MarkovChainState(PerSampleState):
    """``V`` Metropolis–Hastings chains per training example, one per state slot (view) of the example.

    Buffers:
        state_index: ``LongTensor[m, V]``, dataset index of each chain's current negative (``EMPTY_STATE`` before the
            first acceptance).
        state_view: ``LongTensor[m, V]``, the view key of that negative (what re-creates it: an augmentation seed or
            a fixed augmentation's index).
        state_similarity: ``FloatTensor[m, V]``, the similarity ``s(anchor, state)`` when the state was last scored
            (``-inf`` when empty). The similarity, not ``β·s``, so it stays meaningful if β changes.
    """

    def __init__(self, num_samples: int, num_slots: int = 2) -> None:
        super().__init__()
        if num_samples < 1 or num_slots < 1:
            raise ValueError(
                f"MarkovChainState needs num_samples >= 1 and num_slots >= 1, got {num_samples, num_slots}"
            )
        shape = (num_samples, num_slots)
        self.register_buffer("state_index", torch.full(shape, EMPTY_STATE, dtype=torch.long))
        self.register_buffer("state_view", torch.full(shape, EMPTY_STATE, dtype=torch.long))
        self.register_buffer("state_similarity", torch.full(shape, float("-inf"), dtype=torch.float32))

    @property
    def num_samples(self) -> int:
        return self.state_index.shape[0]

    @property
    def num_slots(self) -> int:
        return self.state_index.shape[1]

    def read(self, keys: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(state_index, state_view, state_similarity)`` of the chains ``(keys[a], slots[a])``, each ``[A]``.

        Args:
            keys: ``LongTensor[A]``, dataset indices.
            slots: ``LongTensor[A]``, the state slot (view) of each chain, ``< num_slots``.
        """
        self._check_slots(slots)
        return self.state_index[keys, slots], self.state_view[keys, slots], self.state_similarity[keys, slots]

    def write(
        self,
        keys: torch.Tensor,
        slots: torch.Tensor,
        index: torch.Tensor,
        view: torch.Tensor,
        similarity: torch.Tensor,
    ) -> None:
        """Set the chains ``(keys[a], slots[a])`` to ``(index[a], view[a], similarity[a])``.

        Args:
            keys, slots: ``LongTensor[A]`` each, as in :meth:`read`.
            index: ``LongTensor[A]``, dataset index of each chain's new state (``EMPTY_STATE``: empty).
            view: ``LongTensor[A]``, its view key.
            similarity: ``[A]``, its similarity to the anchor (stored as float32).
        """
        self._check_slots(slots)
        self.state_index[keys, slots] = index
        self.state_view[keys, slots] = view
        self.state_similarity[keys, slots] = similarity.float()

    def _check_slots(self, slots: torch.Tensor) -> None:
        if slots.numel() and int(slots.max()) >= self.num_slots:
            raise ValueError(
                f"state slot {int(slots.max())} does not exist: the chains keep {self.num_slots} slot(s) per example "
                "(num_slots: 2 for two fresh views, A for A fixed augmentations)"
            )


class ChainStateTable:
    """The chains' ``state_index`` and ``state_view`` in CPU shared memory, for DataLoader workers to read.

    The objective's buffers may live on a GPU; the collator runs in worker processes. The trainer writes the rows of
    a batch's examples after every step (:meth:`update`); a worker reads the rows of the batch it collates
    (:meth:`read`). An example's chains change only when it is in a batch — once per epoch under an epoch-wise
    shuffle — so a prefetched batch reads current states (and a stale read is still a valid start, see
    :class:`~emc2_hf.objectives.EMC2Objective`). Pickling keeps the shared memory (workers started by fork or
    spawn see the same tensors).
    """

    def __init__(self, chains: MarkovChainState) -> None:
        self.state_index = chains.state_index.detach().cpu().clone().share_memory_()
        self.state_view = chains.state_view.detach().cpu().clone().share_memory_()

    def refresh(self, chains: MarkovChainState) -> None:
        """Copy every chain (e.g. after a checkpoint was loaded)."""
        self.state_index.copy_(chains.state_index.detach().cpu())
        self.state_view.copy_(chains.state_view.detach().cpu())

    def update(self, chains: MarkovChainState, keys: torch.Tensor) -> None:
        """Copy the chains of the examples ``keys`` (all their slots)."""
        keys = keys.to(chains.state_index.device)
        rows = keys.cpu()
        self.state_index[rows] = chains.state_index[keys].cpu()
        self.state_view[rows] = chains.state_view[keys].cpu()

    def read(self, keys: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(state_index [A], state_view [A])`` of the chains ``(keys[a], slots[a])``."""
        return self.state_index[keys, slots].clone(), self.state_view[keys, slots].clone()


class MovingAverageState(PerSampleState):
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

    def read(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_u [k], initialised [k])`` of the examples ``keys: LongTensor[k]`` (``log_u`` is 0 where not
        initialised)."""
        return self.log_u[keys], self.initialised[keys]

    def write(self, keys: torch.Tensor, log_u: torch.Tensor, initialised: torch.Tensor | None = None) -> None:
        """Set ``log u`` of the examples ``keys [k]`` to ``log_u [k]`` (stored as float32).

        Args:
            keys: ``LongTensor[k]``, distinct dataset indices.
            log_u: ``[k]``, the new ``log u``.
            initialised: ``BoolTensor[k]``; default all True (a written ``u`` has received an estimate).
        """
        self.log_u[keys] = log_u.to(self.log_u.dtype)
        self.initialised[keys] = True if initialised is None else initialised.to(torch.bool)


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
    try:
        saved = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} cannot be read ({error}); the checkpoint is incomplete or corrupt. Resume from the previous "
            "checkpoint in the same folder instead."
        ) from None
    if set(saved) != set(expected):
        raise ValueError(
            f"{path} holds per-sample state {sorted(saved)} but {type(module).__name__} expects {sorted(expected)}: "
            "the checkpoint was written with another objective."
        )
    for name, buffer in expected.items():
        if saved[name].shape != buffer.shape:
            raise ValueError(
                f"{path}: '{name}' has shape {tuple(saved[name].shape)} but this run expects {tuple(buffer.shape)} "
                "(training-set size × state slots): a checkpoint resumes only on the training set and with the "
                "number of fixed augmentations it was written for."
            )
        buffer.copy_(saved[name].to(buffer.device))
    return True
