"""Random numbers keyed by (seed, step, ...), so a run draws the same numbers however it is resumed."""

from __future__ import annotations

import hashlib

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
