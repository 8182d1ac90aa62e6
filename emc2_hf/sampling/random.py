"""Random numbers keyed by (seed, step, ...), so a run draws the same numbers however it is resumed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch


def keyed_seed(*keys: int | str) -> int:
    """A 63-bit seed derived from ``keys`` (e.g. ``(seed, global_step, micro_step)``) by hashing.

    Different keys give statistically independent streams; the same keys always give the same stream.
    """
    digest = hashlib.blake2b("/".join(str(key) for key in keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(*keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`keyed_seed` of ``keys``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(keyed_seed(*keys))
    return generator


def keyed_transform(transform: Callable[[Any], torch.Tensor], image: Any, key: int) -> torch.Tensor:
    """``transform(image)`` with torch's default CPU generator seeded by ``key`` (and restored afterwards), so the
    same key always gives the same random view; ``key = -1`` (no key) draws from the generator as it is.

    Only the CPU generator is seeded (``torch.manual_seed`` would also seed CUDA: ~40× slower): 4 µs per view.
    """
    if key == -1:
        return transform(image)
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(key)
    try:
        return transform(image)
    finally:
        generator.set_state(saved)


def chain_selection(
    seed: int, epoch: int, dataset_indices: torch.Tensor, slots: torch.Tensor, fraction: float
) -> torch.Tensor:
    """``BoolTensor[A]``: which chains ``(dataset index, slot)`` run in ``epoch``, each with probability ``fraction``.

    Keyed by ``(seed, epoch, index, slot)`` only, so the choice is independent of the batch and of the chain's state
    (EMC²'s ``chain_fraction`` stays unbiased), and the collator and the objective's caller agree on it.
    """
    if fraction >= 1.0:
        return torch.ones(dataset_indices.shape, dtype=torch.bool)
    draws = [
        keyed_seed(seed, "chain", epoch, int(index), int(slot)) / float(1 << 63)
        for index, slot in zip(dataset_indices.tolist(), slots.tolist(), strict=True)
    ]
    return torch.tensor(draws, dtype=torch.float64) < fraction
