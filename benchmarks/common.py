"""Shared helpers for the benchmark scripts: timing with medians, machine description, result tables."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def machine() -> str:
    """One line naming the processor, core count, torch build and device."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}; {torch.get_num_threads()} torch threads; torch {torch.__version__}; {device}"


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], object], repetitions: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``run()`` over ``repetitions`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    synchronise(device)
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        run()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(title: str, header: list[str], rows: list[list[object]], output: str | None = None) -> None:
    """Print a markdown table; append it (with the machine line) to ``output`` as JSON lines if given."""
    lines = [
        f"### {title}",
        "",
        f"Machine: {machine()}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    print("\n".join(lines) + "\n", flush=True)
    if output:
        with open(output, "a") as handle:
            handle.write(json.dumps({"title": title, "machine": machine(), "header": header, "rows": rows}) + "\n")


def plain_info_nce(embeddings: torch.Tensor, beta: float) -> torch.Tensor:
    z = F.normalize(embeddings.float(), dim=1)
    logits = beta * z @ z.t()
    n = logits.shape[0]
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = (torch.arange(n, device=z.device) + n // 2) % n
    return F.cross_entropy(logits, targets)
