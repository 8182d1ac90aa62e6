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
