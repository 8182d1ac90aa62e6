"""What splitting EMC²'s anchors by process would save: the global objective step against one process's share.

    python benchmarks/local_anchors.py --num_processes 1 2 4 8 --batch_sizes 32 256 --output local.jsonl

Today every one of the ``N`` processes evaluates the whole objective of the gathered global batch: ``2bN`` anchors
against the ``2bN`` views (+ the re-encoded chain states), the sweep of every anchor, the weights and the surrogate's
backward — the same work on every process, so that all of them apply the same per-sample state update. This times,
on one process (CPU, ``--threads`` torch threads):

* **global**: ``EMC2Objective`` on ``two_view_problem(embeddings [2bN, d], …)`` with a state column per anchor (every
  chain on a view of an image outside the batch, as in steady state): problem, negative weights (picks, proposals,
  sweep, weights, chain write), surrogate and its backward;
* **local**: the same step for the ``2b`` anchors of one process only (its ``b`` images' two views) against all
  ``2bN`` views and the states of its own anchors: a :class:`~emc2_hf.objectives.ContrastiveProblem` of ``2b``
  anchors × ``(2bN + k)`` candidates built by :func:`local_two_view_problem` (``two_view_problem`` makes every view
  an anchor, so it cannot express this), whose rows are those of the global problem (checked).

The ratio global / local is what a process would save per objective step. The sweep length is the same in both
(``R = 2bN − 2`` proposals per anchor, a Python loop of ``R`` vectorised steps), so only the width of each step
shrinks. Splitting changes nothing mathematically only if every process still applies the chain update of every
anchor: the new states of the other processes' anchors (index int64 + view key int64 + similarity float32 = 20 B
per chain) must be all-gathered after the sweep — reported as bytes per step next to the embedding all-gather that
already happens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from emc2_hf.objectives import ContrastiveProblem, EMC2Objective, states_to_encode, two_view_problem

from common import machine, print_table, synchronise

CHAIN_STATE_BYTES = 8 + 8 + 4
"""One chain's state: dataset index (int64), view key (int64), similarity (float32)."""


def local_two_view_problem(
    embeddings: torch.Tensor,
    dataset_indices: torch.Tensor,
    rank: int,
    num_processes: int,
    *,
    state_embeddings: torch.Tensor,
    state_keys: torch.Tensor,
    state_views: torch.Tensor,
    start_keys: torch.Tensor,
    start_views: torch.Tensor,
) -> ContrastiveProblem:
    """The anchors of process ``rank`` of the global two-view batch, against every view and their own states.

    Args:
        embeddings: ``[2bN, d]``, the gathered global batch (view 1 of every process's images in rank order, then
            view 2, as :func:`~emc2_hf.training.distributed.gather_views` lays it out).
        dataset_indices: ``LongTensor[bN]``, distinct.
        rank, num_processes: which of the ``N`` processes' ``b`` images are the anchors.
        state_embeddings: ``[k, d]``, re-encoded chain states of the local anchors.
        state_keys, state_views: ``LongTensor[k]``, their dataset indices and view keys.
        start_keys, start_views: ``LongTensor[2b]``, each local anchor's chain state (view 1 of the local images,
            then view 2).

    Returns:
        A problem of ``2b`` anchors × ``2bN + k`` candidates; anchor ``j`` is row ``rows[j]`` of the global problem
        (``rows = [rb … (r+1)b − 1, bN + rb … bN + (r+1)b − 1]``) with the same similarities, positive and
        negatives on the batch's columns.
    """
    num_images = dataset_indices.numel()
    per_process = num_images // num_processes
    device = embeddings.device
    local = torch.arange(rank * per_process, (rank + 1) * per_process, device=device)
    rows = torch.cat([local, local + num_images])  # [2b]
    views = F.normalize(embeddings.float(), dim=-1)  # [2bN, d]
    view_slots = torch.arange(2, device=device).repeat_interleave(num_images)
    batch_keys = dataset_indices.to(device).repeat(2)
    anchor_keys = batch_keys[rows]
    owners = (start_keys[:, None] == state_keys[None, :]) & (start_views[:, None] == state_views[None, :])
    owners &= anchor_keys[:, None] != state_keys[None, :]
    candidates = torch.cat([views, F.normalize(state_embeddings.float(), dim=-1)])
    return ContrastiveProblem(
        similarities=views[rows] @ candidates.t(),
        positive_columns=(rows + num_images) % (2 * num_images),
        negative_mask=torch.cat([anchor_keys[:, None] != batch_keys[None, :], owners], dim=1),
        anchor_keys=anchor_keys,
        anchor_slots=view_slots[rows],
        candidate_keys=torch.cat([batch_keys, state_keys]),
        candidate_views=torch.cat([view_slots, state_views]),
        num_batch_columns=2 * num_images,
        self_columns=rows,
        start_keys=start_keys,
        start_views=start_views,
    )


def _batch(objective: EMC2Objective, num_images: int, dataset_size: int, dim: int, generator: torch.Generator):
    """A global batch in steady state: indices ``[bN]``, every chain on a view of an image outside the batch."""
    indices = torch.randperm(dataset_size, generator=generator)[:num_images]
    objective.chains.state_index[indices] = (indices[:, None] + 1 + torch.arange(2)) % dataset_size
    objective.chains.state_view[indices] = torch.arange(2)
    keys = indices.repeat(2)
    slots = torch.arange(2).repeat_interleave(num_images)
    start_keys, start_views = objective.chain_starts(keys, slots)
    return {
        "indices": indices,
        "keys": keys,
        "slots": slots,
        "start_keys": start_keys,
        "start_views": start_views,
        "embeddings": torch.randn(2 * num_images, dim, generator=generator),
    }


def _global_step(objective: EMC2Objective, batch: dict, state_embeddings: torch.Tensor, step: int) -> None:
    """One objective step on the whole global batch (every process's work today)."""
    start_keys, start_views = batch["start_keys"], batch["start_views"]
    state_keys, state_views = states_to_encode(start_keys, start_views, batch["keys"], batch["slots"])
    embeddings = batch["embeddings"].clone().requires_grad_(True)
    states = state_embeddings[: state_keys.numel()].clone().requires_grad_(True)
    problem = two_view_problem(
        embeddings,
        batch["indices"],
        state_embeddings=states,
        state_keys=state_keys,
        state_views=state_views,
        start_keys=start_keys,
        start_views=start_views,
    )
    objective(problem, step=step).loss.backward()


def _local_step(objective: EMC2Objective, batch: dict, state_embeddings: torch.Tensor, step: int, n: int) -> None:
    """One objective step on the anchors of process 0 only (what one process would do with split anchors)."""
    num_images = batch["indices"].numel()
    per_process = num_images // n
    rows = torch.cat([torch.arange(per_process), num_images + torch.arange(per_process)])
    start_keys, start_views = batch["start_keys"][rows], batch["start_views"][rows]
    state_keys, state_views = states_to_encode(start_keys, start_views, batch["keys"], batch["slots"])
    embeddings = batch["embeddings"].clone().requires_grad_(True)
    states = state_embeddings[: state_keys.numel()].clone().requires_grad_(True)
    problem = local_two_view_problem(
        embeddings,
        batch["indices"],
        0,
        n,
        state_embeddings=states,
        state_keys=state_keys,
        state_views=state_views,
        start_keys=start_keys,
        start_views=start_views,
    )
    objective(problem, step=step).loss.backward()


def check_rows(batch: dict, state_embeddings: torch.Tensor, n: int) -> None:
    """The local problem's rows are the global problem's (similarities, positives, negatives on the batch)."""
    num_images = batch["indices"].numel()
    per_process = num_images // n
    rows = torch.cat([torch.arange(per_process), num_images + torch.arange(per_process)])
    start_keys, start_views = batch["start_keys"], batch["start_views"]
    global_states = states_to_encode(start_keys, start_views, batch["keys"], batch["slots"])
    whole = two_view_problem(
        batch["embeddings"],
        batch["indices"],
        state_embeddings=state_embeddings[: global_states[0].numel()],
        state_keys=global_states[0],
        state_views=global_states[1],
        start_keys=start_keys,
        start_views=start_views,
    )
    local_states = states_to_encode(start_keys[rows], start_views[rows], batch["keys"], batch["slots"])
    part = local_two_view_problem(
        batch["embeddings"],
        batch["indices"],
        0,
        n,
        state_embeddings=state_embeddings[: local_states[0].numel()],
        state_keys=local_states[0],
        state_views=local_states[1],
        start_keys=start_keys[rows],
        start_views=start_views[rows],
    )
    columns = whole.num_batch_columns
    assert part.num_batch_columns == columns
    assert torch.allclose(part.similarities[:, :columns], whole.similarities[rows, :columns], atol=1e-6)
    assert torch.equal(part.positive_columns, whole.positive_columns[rows])
    assert torch.equal(part.batch_negative_mask, whole.batch_negative_mask[rows])
    assert torch.equal(part.anchor_keys, whole.anchor_keys[rows])
    assert torch.equal(part.anchor_slots, whole.anchor_slots[rows])
    assert _owned_states(part, torch.arange(rows.numel())) == _owned_states(whole, rows)


def _owned_states(problem: ContrastiveProblem, rows: torch.Tensor) -> list[set[tuple[int, int]]]:
    """Per anchor of ``rows``, the ``(dataset index, view key)`` of the state columns it owns."""
    start = problem.num_batch_columns
    keys, views = problem.candidate_keys[start:].tolist(), problem.candidate_views[start:].tolist()
    owned = problem.negative_mask[rows, start:]
    return [{(keys[c], views[c]) for c in row.nonzero().flatten().tolist()} for row in owned]


def interleaved_seconds(
    runs: list[Callable[[], None]], repetitions: int, budget: float, device: torch.device
) -> tuple[list[float], list[float], int]:
    """``(median seconds, fastest seconds, repetitions)`` of each of ``runs``, timed in turn within every repetition
    (so a load change on the machine hits all of them alike) after one untimed call each; as many repetitions as
    fit in ``budget`` seconds (at least 1, at most ``repetitions``)."""
    start = time.perf_counter()
    for run in runs:
        run()
    synchronise(device)
    probe = time.perf_counter() - start
    used = max(1, min(repetitions, int(budget / max(probe, 1e-9))))
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(used):
        for run, spent in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            synchronise(device)
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], [min(t) for t in times], used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, nargs="+", default=[1, 2, 4, 8], help="N")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 256], help="b, images per process")
    parser.add_argument("--dataset_size", type=int, default=100_000)
    parser.add_argument("--embedding_dim", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--budget_seconds", type=float, default=60.0, help="time per case (both modes), at most")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--output", default=None, help="append the table as JSON lines")
    parser.add_argument("--json", default=None, help="write the measurements as one JSON document")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    rows, records = [], []
    for per_process in args.batch_sizes:
        for n in args.num_processes:
            num_images = per_process * n
            objective = EMC2Objective(args.dataset_size, 5.0)
            generator = torch.Generator().manual_seed(num_images)
            batches = [
                _batch(objective, num_images, args.dataset_size, args.embedding_dim, generator) for _ in range(2)
            ]
            state_embeddings = torch.randn(2 * num_images, args.embedding_dim, generator=generator)
            check_rows(batches[0], state_embeddings, n)
            counter = iter(range(10**9))

            def global_run() -> None:
                step = next(counter)
                _global_step(objective, batches[step % len(batches)], state_embeddings, step)

            def local_run() -> None:
                step = next(counter)
                _local_step(objective, batches[step % len(batches)], state_embeddings, step, n)

            (global_seconds, local_seconds), fastest, repetitions = interleaved_seconds(
                [global_run, local_run], args.repetitions, args.budget_seconds, device
            )
            exchange = 2 * per_process * (n - 1) * CHAIN_STATE_BYTES  # received per process per step
            embeddings = 2 * per_process * (n - 1) * args.embedding_dim * 4  # float32 views received today
            record = {
                "num_processes": n,
                "images_per_process": per_process,
                "global_anchors": 2 * num_images,
                "local_anchors": 2 * per_process,
                "num_proposals": 2 * num_images - 2,
                "global_seconds": global_seconds,
                "local_seconds": local_seconds,
                "ratio": global_seconds / local_seconds,
                "fastest_seconds": {"global": fastest[0], "local": fastest[1]},
                "repetitions": repetitions,
                "chain_exchange_bytes_received": exchange,
                "embedding_gather_bytes_received": embeddings,
            }
            records.append(record)
            rows.append(
                [
                    n,
                    per_process,
                    f"{2 * num_images} × {2 * num_images}",
                    f"{2 * per_process} × {2 * num_images}",
                    f"{1e3 * global_seconds:.1f}",
                    f"{1e3 * local_seconds:.1f}",
                    f"{global_seconds / local_seconds:.2f}",
                    f"{exchange / 2**10:.1f} KiB (views: {embeddings / 2**10:.0f} KiB)",
                    repetitions,
                ]
            )
    print_table(
        f"EMC² step: global anchors (today, on every process) vs one process's anchors, cpu, {args.threads} threads "
        "(medians, interleaved)",
        [
            "N",
            "b",
            "global: anchors × views",
            "local: anchors × views",
            "global (ms)",
            "local (ms)",
            "global / local",
            "chain exchange received / step",
            "reps",
        ],
        rows,
        args.output,
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine(), "measurements": records}, handle, indent=1)


if __name__ == "__main__":
    main()
