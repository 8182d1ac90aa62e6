"""Per-sample state at scale: its bytes per example, and the objective's step time against the training-set size m.

    python benchmarks/state_size.py --table --output state.jsonl --json state.json     # the memory table only
    python benchmarks/state_size.py --dataset_sizes 1000 100000 10000000 --batch_size 256   # timing, then the table

**Table** (``--table``, also printed after the timing): the bytes per example of every per-sample state, measured
from the real modules — each is instantiated at two small sizes ``m₁ < m₂`` and its buffer bytes' slope
``(bytes(m₂) − bytes(m₁)) / (m₂ − m₁)`` is the per-example cost (a 0-dim buffer, e.g. the cache's refresh
position, is the constant left over) — and the totals on ImageNet-1k (m = 1,281,167) and on a 400M-pair
image–text set, *per process*: every process holds the whole state today. Rows: EMC² with two fresh views (two
chains × (index int64 + view key int64 + similarity float32) = 40 B), with ``A`` fixed augmentations (A chains),
image–text (1 image→text chain per pair + one text→image chain per caption), the host mirror of the chains'
index and view key that DataLoader workers read (:class:`~emc2_hf.sampling.ChainStateTable`, CPU shared memory),
SogCLR's ``u`` (+ initialised flag), and the negative cache (``d`` float32 + filled flag + written step). The last
columns say what int32 dataset indices would save (m < 2³¹), and int32 view codes on top (the stored view key is a
63-bit augmentation seed today, so that one needs a re-derivable code instead of the seed): a suggestion only.

**Timing** (without ``--table``): the objective step (problem, sweep, weights, state update, surrogate and its
backward) on fixed random embeddings, with EMC²'s chain states as state columns (random embeddings), median over
repetitions. The sampler touches only the batch's entries, so time must not grow with ``m``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Callable

import torch
from torch import nn

from emc2_hf.objectives import build_image_text_objective, build_objective, states_to_encode
from emc2_hf.sampling.sample_state import ChainStateTable

from common import machine, median_seconds, print_table

IMAGENET_1K = 1_281_167
"""Training images of ImageNet-1k (ILSVRC-2012)."""
IMAGE_TEXT_400M = 400_000_000
"""Pairs of a LAION-400M-sized image–text set."""
PROBE_SIZES = (1_000, 2_000)
"""``m₁ < m₂`` the modules are instantiated at to measure their per-example bytes."""


State = nn.Module | ChainStateTable | dict[str, ChainStateTable]
"""What a state builder returns: a module (its buffers), a chain mirror, or one mirror per direction."""


def _tensors(state: State) -> dict[str, torch.Tensor]:
    """Every tensor a state holds, by name: a module's buffers, or a :class:`ChainStateTable`'s two tables."""
    if isinstance(state, nn.Module):
        return dict(state.named_buffers())
    if isinstance(state, dict):
        return {f"{key}.{name}": tensor for key, part in state.items() for name, tensor in _tensors(part).items()}
    return {"state_index": state.state_index, "state_view": state.state_view}


def _mirrors(objective: nn.Module) -> dict[str, ChainStateTable]:
    """The trainer's host mirrors of an image–text objective's chains, one per direction."""
    return {direction: ChainStateTable(part.chains) for direction, part in objective.directions.items()}


def measure_bytes(build: Callable[[int], State]) -> tuple[dict[str, float], float]:
    """``({buffer name: bytes per example}, constant bytes)`` of the state ``build(m)`` makes, from its tensors at two
    sizes (the slope in ``m`` and what is left at ``m = 0``)."""
    small, large = (_tensors(build(size)) for size in PROBE_SIZES)
    per_example, constant = {}, 0.0
    for name, tensor in large.items():
        low = small[name].numel() * small[name].element_size()
        high = tensor.numel() * tensor.element_size()
        slope = (high - low) / (PROBE_SIZES[1] - PROBE_SIZES[0])
        if slope:
            per_example[name] = slope
        constant += high - slope * PROBE_SIZES[1]
    return per_example, constant


def _narrowed(per_example: dict[str, float], names: tuple[str, ...], dtypes: dict[str, torch.dtype]) -> float:
    """Bytes per example with the int64 buffers whose name ends with one of ``names`` stored as int32."""
    total = 0.0
    for name, value in per_example.items():
        narrow = name.endswith(names) and dtypes[name] == torch.int64
        total += value / 2 if narrow else value
    return total


def _human(num_bytes: float) -> str:
    """``num_bytes`` in MiB below 1 GiB, else GiB."""
    return f"{num_bytes / 2**20:,.1f} MiB" if num_bytes < 2**30 else f"{num_bytes / 2**30:,.2f} GiB"


def state_specs(
    num_augmentations: int, captions_per_pair: int, embedding_dim: int
) -> list[tuple[str, str, Callable[[int], State] | None]]:
    """``(state, where it lives, builder m → state)`` of every per-sample state (``None``: module not available)."""
    beta = 5.0
    specs: list[tuple[str, str, Callable[[int], State] | None]] = [
        ("EMC² two views (2 chains)", "objective (device)", lambda m: build_objective("emc2", m, beta)),
        (
            f"EMC² {num_augmentations} fixed augmentations ({num_augmentations} chains)",
            "objective (device)",
            lambda m: build_objective("emc2", m, beta, num_slots=num_augmentations),
        ),
        (
            f"EMC² image–text, {captions_per_pair} captions (1 + {captions_per_pair} chains)",
            "objective (device)",
            lambda m: build_image_text_objective("emc2", m, beta, captions_per_pair=captions_per_pair),
        ),
        (
            "EMC² chain mirror, two views (ChainStateTable)",
            "host shared memory",
            lambda m: ChainStateTable(build_objective("emc2", m, beta).chains),
        ),
        (
            f"EMC² chain mirror, image–text ({captions_per_pair} captions)",
            "host shared memory",
            lambda m: _mirrors(build_image_text_objective("emc2", m, beta, captions_per_pair=captions_per_pair)),
        ),
        ("SogCLR u + initialised", "objective (device)", lambda m: build_objective("sogclr", m, beta)),
        (
            "SogCLR image–text (u per direction)",
            "objective (device)",
            lambda m: build_image_text_objective("sogclr", m, beta),
        ),
    ]
    cache_name = f"negative cache, d = {embedding_dim}"
    if importlib.util.find_spec("emc2_hf.objectives.negative_cache") is not None:
        from emc2_hf.objectives.negative_cache import EmbeddingCache

        specs.append((cache_name, "objective (device)", lambda m: EmbeddingCache(m, embedding_dim)))
    else:
        specs.append((cache_name + " (not measured: 4d + 1)", "objective (device)", None))
    return specs


def state_table(
    num_augmentations: int = 8,
    captions_per_pair: int = 5,
    embedding_dim: int = 128,
    output: str | None = None,
    json_path: str | None = None,
) -> list[dict[str, object]]:
    """Print (and append to ``output`` as JSON lines; write to ``json_path`` as one JSON document) the bytes per
    example of every per-sample state and its per-process totals at m = 1.28M and m = 400M.

    Returns:
        One dict per state: ``state``, ``location``, ``measured`` (False: computed as ``4d + 1``),
        ``bytes_per_example`` and its ``layout`` by buffer, ``constant_bytes``, ``bytes_per_example_int32_index``,
        ``bytes_per_example_int32_index_and_view``, and ``bytes_per_process`` at each size.
    """
    sizes = {"imagenet_1k": IMAGENET_1K, "image_text_400m": IMAGE_TEXT_400M}
    records, rows = [], []
    for name, location, build in state_specs(num_augmentations, captions_per_pair, embedding_dim):
        if build is None:
            per_example, constant, dtypes = {"embeddings": 4.0 * embedding_dim, "filled": 1.0}, 0.0, {}
        else:
            per_example, constant = measure_bytes(build)
            dtypes = {key: tensor.dtype for key, tensor in _tensors(build(PROBE_SIZES[0])).items()}
        total = sum(per_example.values())
        index32 = _narrowed(per_example, ("state_index",), dtypes) if dtypes else total
        both32 = _narrowed(per_example, ("state_index", "state_view"), dtypes) if dtypes else total
        record = {
            "state": name,
            "location": location,
            "measured": build is not None,
            "bytes_per_example": total,
            "layout": per_example,
            "constant_bytes": constant,
            "bytes_per_example_int32_index": index32,
            "bytes_per_example_int32_index_and_view": both32,
            "bytes_per_process": {key: total * size + constant for key, size in sizes.items()},
        }
        records.append(record)
        rows.append(
            [
                name,
                location,
                f"{total:g}",
                _human(total * IMAGENET_1K + constant),
                _human(total * IMAGE_TEXT_400M + constant),
                f"{index32:g} ({_human(index32 * IMAGE_TEXT_400M)})",
                f"{both32:g} ({_human(both32 * IMAGE_TEXT_400M)})",
            ]
        )
    print_table(
        "Per-sample state: bytes per example and per process (every process holds all of it)",
        [
            "state",
            "where",
            "B / example",
            f"m = {IMAGENET_1K:,} (ImageNet-1k)",
            f"m = {IMAGE_TEXT_400M:,} (400M pairs)",
            "int32 index: B (400M)",
            "int32 index + view code: B (400M)",
        ],
        rows,
        output,
    )
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"machine": machine(), "sizes": sizes, "states": records}, handle, indent=1)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_sizes", type=int, nargs="+", default=[1_000, 100_000, 10_000_000])
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repetitions", type=int, default=11)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="append the tables as JSON lines")
    parser.add_argument("--table", action="store_true", help="print the state-size table only (no timing)")
    parser.add_argument("--json", default=None, help="write the state-size table as one JSON document")
    parser.add_argument("--num_augmentations", type=int, default=8, help="A of the fixed-augmentation row")
    parser.add_argument("--captions_per_pair", type=int, default=5, help="captions of the image–text row")
    parser.add_argument("--embedding_dim", type=int, default=128, help="d of the negative-cache row")
    args = parser.parse_args()
    table = {
        "num_augmentations": args.num_augmentations,
        "captions_per_pair": args.captions_per_pair,
        "embedding_dim": args.embedding_dim,
        "output": args.output,
        "json_path": args.json,
    }
    if args.table:
        state_table(**table)
        return
    device = torch.device(args.device)
    rows = []
    for name in ("emc2", "sogclr"):
        base = None
        for size in args.dataset_sizes:
            objective = build_objective(name, size, 5.0).to(device)
            memory = sum(buffer.numel() * buffer.element_size() for buffer in objective.buffers())
            generator = torch.Generator().manual_seed(0)
            embeddings = torch.randn(2 * args.batch_size, 128, device=device, requires_grad=True)
            step = iter(range(10**9))
            # Batches drawn before timing: a 10M-element randperm per step would dwarf the objective.
            batches = [torch.randperm(size, generator=generator)[: args.batch_size].to(device) for _ in range(4)]

            def run() -> None:
                current = next(step)
                indices = batches[current % len(batches)]
                arguments = {}
                if objective.reencodes_chain_states:
                    keys, slots = indices.repeat(2), torch.arange(2, device=device).repeat_interleave(indices.numel())
                    start_keys, start_views = objective.chain_starts(keys, slots)
                    state_keys, state_views = states_to_encode(start_keys, start_views, keys, slots)
                    arguments = {
                        "state_embeddings": torch.randn(state_keys.numel(), 128, device=device, requires_grad=True),
                        "state_keys": state_keys,
                        "state_views": state_views,
                        "start_keys": start_keys,
                        "start_views": start_views,
                    }
                objective(embeddings, indices, step=current, **arguments).loss.backward()

            seconds = median_seconds(run, args.repetitions, 3, device)
            base = base or seconds
            rows.append(
                [name, f"{size:,}", f"{memory / 2**20:.2f} MiB", f"{1e3 * seconds:.2f}", f"{seconds / base:.2f}"]
            )
    print_table(
        f"Objective step vs training-set size m, b = {args.batch_size} on {device.type}",
        ["objective", "m", "state memory", "step (ms)", "ratio to smallest m"],
        rows,
        args.output,
    )
    state_table(**table)


if __name__ == "__main__":
    main()
