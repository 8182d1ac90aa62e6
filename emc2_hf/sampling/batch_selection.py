"""High-loss mini-batch selection (Cho et al., 2023, "Mini-Batch Optimization of Contrastive Loss").

Cho et al. show that mini-batch contrastive learning matches full-batch only when all ``C(m, B)`` batches are seen,
and that SGD converges faster when it trains on *high-loss* batches. They find such batches once an epoch by
spectral clustering of an affinity built from the pairwise loss terms (:class:`SpectralClusteringBatchSampler`) and
compare with Ordered SGD, the highest-loss of a few random batches (:class:`OrderedSGDBatchSampler`).

Both are epoch-aware batch samplers (``DataLoader(batch_sampler=...)``) with one base class,
:class:`HighLossBatchSampler`. Once an epoch the caller embeds every training example (two views, or image and
text) with the current encoder and calls :meth:`HighLossBatchSampler.update`; the sampler then yields that epoch's
global batches. An epoch nobody embedded gets a random partition. Everything is keyed by ``(seed, epoch)``, so every
process computes the same batches from the same embeddings, and a resumed run gets back the same batches.

Sharding under Accelerate. A *global* batch of ``B`` examples (all processes, one optimisation step) is yielded as
``num_processes`` consecutive chunks of ``B / N`` indices. Accelerate's ``BatchSamplerShard`` (``split_batches=False``)
hands list ``i`` to process ``i mod N``, so process ``r`` gets chunk ``r`` and the chunks concatenated in rank order
are the global batch. ``BatchSamplerShard`` only yields lists whose length equals the wrapped sampler's
``batch_size`` attribute. For that reason :attr:`HighLossBatchSampler.batch_size` is the **per-process** chunk size
``B / N``, :attr:`HighLossBatchSampler.global_batch_size` is ``B``, and ``drop_last`` is ``True``.
Accelerate's ``DataLoaderShard.set_epoch`` does not reach a custom batch sampler, so call
:meth:`HighLossBatchSampler.set_epoch` (or :meth:`HighLossBatchSampler.update`, which sets the epoch) yourself.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from .random import keyed_generator, keyed_seed

__all__ = [
    "BATCH_SELECTIONS",
    "HighLossBatchSampler",
    "OrderedSGDBatchSampler",
    "SpectralClusteringBatchSampler",
    "balanced_assignment",
    "batch_contrastive_losses",
    "build_batch_sampler",
    "contrastive_affinity",
]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _check_inverse_temperature(inverse_temperature: float | torch.Tensor) -> float:
    beta = (
        float(inverse_temperature.detach()) if isinstance(inverse_temperature, torch.Tensor) else inverse_temperature
    )
    beta = float(beta)
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"inverse_temperature must be a finite positive number, got {inverse_temperature!r}")
    return beta


def _check_view_embeddings(view_embeddings: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``FloatTensor[m, 2, d]`` → its float32 copy with every view L2-normalised (same shape)."""
    if not isinstance(view_embeddings, torch.Tensor) or not view_embeddings.is_floating_point():
        raise TypeError("view_embeddings must be a floating-point torch.Tensor of shape [num_samples, 2, d]")
    shape = tuple(view_embeddings.shape)
    if view_embeddings.ndim != 3 or shape[0] != num_samples or shape[1] != 2 or shape[2] < 1:
        raise ValueError(
            f"view_embeddings must have shape [num_samples={num_samples}, 2, d] (two views, or image and text, of "
            f"every training example, in dataset order), got {list(shape)}"
        )
    features = view_embeddings.detach().float()
    if not torch.isfinite(features).all():
        raise ValueError("view_embeddings contain NaN or infinite values")
    return F.normalize(features, dim=-1)


def batch_contrastive_losses(
    features: torch.Tensor,
    batches: torch.Tensor,
    inverse_temperature: float,
    *,
    same_view_negatives: bool = True,
    max_chunk_bytes: int = 1 << 28,
) -> torch.Tensor:
    """The contrastive loss of each batch, computed directly (batched, no autograd).

    With ``u_i, v_i`` the two L2-normalised views of example ``i`` and a batch ``S`` of ``b`` examples:

    * ``same_view_negatives=True`` — SimCLR's NT-Xent over the ``2b`` views ``z = (u_S, v_S)`` (what
      :func:`emc2_hf.objectives.info_nce_loss` gives on :func:`emc2_hf.objectives.two_view_problem`)::

          ℓ(S) = 1/(2b) Σ_{a=1}^{2b} [ −β z_a·z_{p(a)} + log Σ_{c ≠ a} exp(β z_a·z_c) ]

    * ``same_view_negatives=False`` — CLIP's symmetric InfoNCE (image ``u``, text ``v``; cross-modal negatives only)::

          ℓ(S) = 1/(2b) Σ_{i ∈ S} [ log Σ_{j ∈ S} exp(β u_i·v_j) + log Σ_{j ∈ S} exp(β v_i·u_j) − 2β u_i·v_i ]

    Args:
        features: ``FloatTensor[m, 2, d]``, L2-normalised views of every example.
        batches: ``LongTensor[n, b]``, dataset indices of each batch (distinct within a batch).
        inverse_temperature: ``β``.
        same_view_negatives: NT-Xent (``True``) or the symmetric cross-modal loss (``False``).
        max_chunk_bytes: bound on the ``[c, 2b, 2b]`` similarity block computed at once.

    Returns:
        ``FloatTensor[n]`` on ``features.device``.
    """
    num_batches, size = batches.shape
    batches = batches.to(features.device)
    per_batch_bytes = 4 * (2 * size) ** 2
    chunk = max(1, max_chunk_bytes // per_batch_bytes)
    losses = []
    with torch.no_grad():
        for start in range(0, num_batches, chunk):
            views = features[batches[start : start + chunk]]  # [c, b, 2, d]
            u, v = views[:, :, 0], views[:, :, 1]
            if same_view_negatives:
                z = torch.cat([u, v], dim=1)  # [c, 2b, d]
                logits = inverse_temperature * (z @ z.transpose(1, 2))  # [c, 2b, 2b]
                positions = torch.arange(2 * size, device=features.device)
                positive = logits[:, positions, (positions + size) % (2 * size)]  # [c, 2b]
                logits[:, positions, positions] = float("-inf")
                losses.append((torch.logsumexp(logits, dim=-1) - positive).mean(dim=-1))
            else:
                logits = inverse_temperature * (u @ v.transpose(1, 2))  # [c, b, b], rows images, columns texts
                positive = torch.diagonal(logits, dim1=1, dim2=2)  # [c, b]
                image_to_text = (torch.logsumexp(logits, dim=2) - positive).mean(dim=-1)
                text_to_image = (torch.logsumexp(logits, dim=1) - positive).mean(dim=-1)
                losses.append(0.5 * (image_to_text + text_to_image))
    return torch.cat(losses) if losses else torch.zeros(0, device=features.device)


def contrastive_affinity(
    view_embeddings: torch.Tensor, inverse_temperature: float, *, same_view_negatives: bool = True
) -> torch.Tensor:
    """The affinity of Cho et al.'s spectral clustering: the loss terms a pair of examples puts in each other's batch.

    With L2-normalised views ``u_i, v_i`` (``[:, 0]`` and ``[:, 1]``)::

        A_ij = exp(β (u_i·v_j − 1)) + exp(β (u_j·v_i − 1))                    (cross-view terms, the paper's A)
             [ + exp(β (u_i·u_j − 1)) + exp(β (v_i·v_j − 1))  if same_view_negatives ],      A_ii = 0.

    Why: anchor ``u_i``'s InfoNCE in a batch ``S`` is ``log(1 + Σ_{j ∈ S, j ≠ i} exp(β(u_i·v_j − u_i·v_i)))``. It
    grows with every negative term ``exp(β u_i·v_j)`` of ``S``, and ``log(1 + x) ≤ x`` bounds it by their sum. Sum
    over both directions (``u_i`` over ``v``, ``v_i`` over ``u``) and every anchor of ``S``: the batch's negative mass
    is ``Σ_{i<j ∈ S} A_ij``, the affinity inside ``S``, and the sum over a partition's batches is the total affinity
    minus the cut between batches. So high-loss batches are a partition into ``m / B`` equal parts with a small cut,
    which is the problem spectral clustering relaxes. The positive terms ``u_i·v_i`` are left out. They depend on
    ``i`` alone, and with aligned positives (the state training moves to) they scale ``A`` by a common factor. SimCLR's
    NT-Xent also counts the other image's same-view views (``u_i·u_j``, ``v_i·v_j``) in each denominator, so those
    terms are added when ``same_view_negatives`` (two image views). For image–text (CLIP) pass ``False``.

    The ``− 1`` (every cosine is ≤ 1) scales ``A`` by ``e^{−β}``. That keeps ``exp`` from overflowing even in float64
    at CLIP's ``β = 100``, and it changes nothing downstream: the normalised Laplacian ``I − D^{-1/2} A D^{-1/2}`` does
    not depend on the scale of ``A``. Entries underflow to 0 only for ``β ≳ 350``.

    Memory: ``[m, m]`` float64, ``8 m²`` bytes (3.2 GB at ``m = 20,000``), with one more such block at peak.

    Args:
        view_embeddings: ``FloatTensor[m, 2, d]`` (normalised here).
        inverse_temperature: ``β > 0``.
        same_view_negatives: add the same-view terms (two image views, NT-Xent).

    Returns:
        ``DoubleTensor[m, m]``, symmetric, non-negative, zero diagonal, on ``view_embeddings.device``.
    """
    beta = _check_inverse_temperature(inverse_temperature)
    features = F.normalize(view_embeddings.detach().double(), dim=-1)
    u, v = features[:, 0], features[:, 1]
    cross = (u @ v.T).sub_(1.0).mul_(beta).exp_()  # exp(β(u_i·v_j − 1)), [m, m]
    affinity = cross + cross.T
    del cross
    if same_view_negatives:
        for view in (u, v):
            affinity += (view @ view.T).sub_(1.0).mul_(beta).exp_()
    affinity.fill_diagonal_(0.0)
    return affinity


def balanced_assignment(distances: np.ndarray, capacity: int) -> np.ndarray:
    """Assign points to centres with at most ``capacity`` points per centre: the global greedy matching.

    The rule: repeatedly take the closest (point, centre) pair over all pairs whose point is unassigned and whose
    centre still has room, and assign it. When distances are symmetric preferences (a point prefers nearer centres,
    a centre nearer points), this greedy matching is the unique stable matching. So it is computed here by
    deferred acceptance (Gale–Shapley, vectorised). Each round, every unassigned point proposes to its nearest centre
    that has not yet rejected it. Each centre keeps its ``capacity`` nearest among its holders and the new proposers
    and rejects the rest. Ties go to the lower point index. The result is deterministic.

    Args:
        distances: ``float[n, k]``, distance of each point to each centre.
        capacity: points per centre; ``n ≤ k · capacity``.

    Returns:
        ``int64[n]``, the centre of each point; with ``n = k · capacity`` every centre gets exactly ``capacity``.
    """
    distances = np.asarray(distances, dtype=np.float64)
    num_points, num_centres = distances.shape
    if num_points > num_centres * capacity:
        raise ValueError(f"{num_points} points do not fit in {num_centres} centres of capacity {capacity}")
    preferences = np.argsort(distances, axis=1, kind="stable")
    next_choice = np.zeros(num_points, dtype=np.int64)
    assignment = np.full(num_points, -1, dtype=np.int64)
    while True:
        free = np.flatnonzero(assignment < 0)
        if free.size == 0:
            return assignment
        proposals = preferences[free, next_choice[free]]
        next_choice[free] += 1
        assignment[free] = proposals
        points = np.flatnonzero(np.isin(assignment, np.unique(proposals)))
        centres = assignment[points]
        order = np.lexsort((points, distances[points, centres], centres))  # by centre, then distance, then index
        sorted_centres = centres[order]
        rank = np.arange(order.size) - np.searchsorted(sorted_centres, sorted_centres, side="left")
        assignment[points[order[rank >= capacity]]] = -1


class HighLossBatchSampler(Sampler[list[int]]):
    """Base class: epoch-aware global batches, sharded into per-process chunks, resumable from a state dict.

    Each epoch has ``num_batches = m // B`` global batches, a ``LongTensor[num_batches, B]`` of dataset indices.
    For an epoch that :meth:`update` has not selected, they are a random partition of a random
    ``num_batches · B`` of the ``m`` examples: the remaining ``m mod B`` are dropped (``drop_last``). The partition is
    drawn from a generator keyed by ``(seed, epoch)``, so it is identical on every process. Subclasses implement
    :meth:`_select`. The base class alone is a plain epoch-seeded random batch sampler.

    Args:
        num_samples: ``m``, the training-set size.
        batch_size: the **global** batch ``B`` (examples per optimisation step, all processes together). Must be
            divisible by ``num_processes`` and at most ``m``.
        num_processes: ``N``, the data-parallel processes; each gets ``B / N`` indices per step.
        seed: keys every random draw.
        same_view_negatives: which loss "high loss" means. ``True`` (default): SimCLR's NT-Xent over two image views,
            whose denominators include same-view negatives. ``False``: CLIP's symmetric image–text InfoNCE.

    Attributes:
        global_batch_size: ``B``.
        batch_size: ``B / N``, the length of every yielded list. Accelerate's ``BatchSamplerShard`` requires it.
        drop_last: always ``True``.
        num_batches: ``m // B``, global batches (optimisation steps) per epoch.
        epoch: the epoch :meth:`__iter__` yields.
    """

    name = "random"

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_processes: int = 1,
        seed: int = 0,
        *,
        same_view_negatives: bool = True,
    ) -> None:
        super().__init__()
        num_samples = _check_int("num_samples", num_samples, 2)
        batch_size = _check_int("batch_size", batch_size, 1)
        num_processes = _check_int("num_processes", num_processes, 1)
        if batch_size < 2:
            raise ValueError("batch_size (the global batch B) must be at least 2: a contrastive batch needs negatives")
        if batch_size % num_processes:
            lower = batch_size // num_processes * num_processes
            raise ValueError(
                f"the global batch_size {batch_size} must be divisible by num_processes={num_processes} (every "
                f"process gets B / N examples per step): use a multiple of {num_processes}, e.g. "
                f"{max(lower, num_processes)} or {lower + num_processes}"
            )
        if batch_size > num_samples:
            raise ValueError(
                f"the global batch_size {batch_size} exceeds the {num_samples} training examples: lower it to at most "
                f"{num_samples} (per-process batch × num_processes) or train on more data"
            )
        self.num_samples = num_samples
        self.global_batch_size = batch_size
        self.num_processes = num_processes
        self.batch_size = batch_size // num_processes
        self.drop_last = True
        self.num_batches = num_samples // batch_size
        self.seed = int(seed)
        self.same_view_negatives = bool(same_view_negatives)
        self.epoch = 0
        self._selected_epoch: int | None = None
        self._selected: torch.Tensor | None = None

    # -- batches -------------------------------------------------------------------------------------------------

    def random_batches(self, epoch: int) -> torch.Tensor:
        """``LongTensor[num_batches, B]``: the random partition of ``epoch``. The first ``num_batches · B`` entries
        of a permutation keyed by ``(seed, "random_batches", epoch)``, row by row."""
        generator = keyed_generator(self.seed, "random_batches", epoch)
        permutation = torch.randperm(self.num_samples, generator=generator)
        return permutation[: self.num_batches * self.global_batch_size].view(self.num_batches, self.global_batch_size)

    def batches(self, epoch: int | None = None) -> torch.Tensor:
        """``LongTensor[num_batches, B]`` of ``epoch`` (default: :attr:`epoch`). These are the selected batches if
        :meth:`update` (or :meth:`load_state_dict`) provided that epoch, otherwise :meth:`random_batches`."""
        epoch = self.epoch if epoch is None else _check_int("epoch", epoch, 0)
        if self._selected is not None and self._selected_epoch == epoch:
            return self._selected.clone()
        return self.random_batches(epoch)

    @property
    def selected_epoch(self) -> int | None:
        """The epoch whose batches were selected from embeddings (``None``: none yet)."""
        return self._selected_epoch

    def update(self, view_embeddings: torch.Tensor, inverse_temperature: float | torch.Tensor, epoch: int) -> None:
        """Select the global batches of ``epoch`` from the current encoder's embeddings, and make it the epoch.

        Args:
            view_embeddings: ``FloatTensor[m, 2, d]``, two views of every training example in dataset order (for
                image–text pairs ``[:, 0]`` image, ``[:, 1]`` text). Any float dtype or device. L2-normalised here.
            inverse_temperature: ``β`` of the loss (float or 0-dim tensor, e.g. a learned logit scale).
            epoch: the epoch these batches are for. Random draws are keyed by ``(seed, epoch)``, so every process
                computes the same batches from the same embeddings.
        """
        epoch = _check_int("epoch", epoch, 0)
        beta = _check_inverse_temperature(inverse_temperature)
        features = _check_view_embeddings(view_embeddings, self.num_samples)
        batches = self._select(features, beta, epoch).to(device="cpu", dtype=torch.long).contiguous()
        if tuple(batches.shape) != (self.num_batches, self.global_batch_size):
            raise RuntimeError(
                f"{type(self).__name__}._select returned shape {list(batches.shape)}, "
                f"expected {[self.num_batches, self.global_batch_size]}"
            )
        self._selected, self._selected_epoch = batches, epoch
        self.epoch = epoch

    def _select(self, features: torch.Tensor, inverse_temperature: float, epoch: int) -> torch.Tensor:
        """``features: FloatTensor[m, 2, d]`` (L2-normalised) → ``LongTensor[num_batches, B]``."""
        raise NotImplementedError(f"{type(self).__name__} does not select batches; use a subclass")

    # -- Sampler protocol ----------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the epoch :meth:`__iter__` yields."""
        self.epoch = _check_int("epoch", epoch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        """For each global batch in order, its ``num_processes`` consecutive chunks of ``B / N`` indices."""
        chunk = self.batch_size
        for batch in self.batches().tolist():
            for rank in range(self.num_processes):
                yield batch[rank * chunk : (rank + 1) * chunk]

    def __len__(self) -> int:
        """Lists yielded per epoch: ``num_batches · num_processes``."""
        return self.num_batches * self.num_processes

    # -- checkpointing -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current epoch and its batches, as contiguous CPU tensors (``safetensors.torch.save_file`` takes it).

        Keys: ``epoch`` (0-dim int64), ``batches`` (``LongTensor[num_batches, B]``), and ``num_samples`` and
        ``global_batch_size`` (0-dim int64), which :meth:`load_state_dict` checks.
        """
        return {
            "epoch": torch.tensor(self.epoch, dtype=torch.long),
            "batches": self.batches().contiguous(),
            "num_samples": torch.tensor(self.num_samples, dtype=torch.long),
            "global_batch_size": torch.tensor(self.global_batch_size, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`: this epoch then yields exactly the saved batches (whatever their source).

        ``num_processes`` may differ from the saving run's. The global batches stay the same; only their chunking
        changes.
        """
        missing = sorted({"epoch", "batches", "num_samples", "global_batch_size"} - set(state))
        if missing:
            raise KeyError(f"batch sampler state lacks {missing}")
        for key, expected in (("num_samples", self.num_samples), ("global_batch_size", self.global_batch_size)):
            if int(state[key]) != expected:
                raise ValueError(
                    f"the saved batch sampler has {key}={int(state[key])} but this one has {expected}: resume with "
                    "the same training set and global batch size"
                )
        batches = state["batches"].to(device="cpu", dtype=torch.long)
        if tuple(batches.shape) != (self.num_batches, self.global_batch_size):
            expected = [self.num_batches, self.global_batch_size]
            raise ValueError(f"saved batches have shape {list(batches.shape)}, expected {expected}")
        if batches.numel() and (batches.min() < 0 or batches.max() >= self.num_samples):
            raise ValueError(f"saved batches hold indices outside [0, {self.num_samples})")
        self.epoch = _check_int("epoch", int(state["epoch"]), 0)
        self._selected, self._selected_epoch = batches.clone(), self.epoch


class SpectralClusteringBatchSampler(HighLossBatchSampler):
    """Cho et al.'s spectral clustering (SC): partition the examples into ``m // B`` equal batches of high affinity.

    Each epoch :meth:`update` runs these steps:

    1. Drop a random ``m mod B`` examples (keyed by ``(seed, epoch)``). The same examples are not always the ones
       left out.
    2. Build the affinity ``A`` of :func:`contrastive_affinity` over the ``n = (m // B) · B`` kept examples:
       ``A_ij = exp(β u_i·v_j) + exp(β u_j·v_i)`` (+ the same-view terms for two image views), zero diagonal.
    3. Embed the examples by ``sklearn.manifold.spectral_embedding(A, n_components=m // B)`` (the normalised
       Laplacian's bottom eigenvectors). Cluster them with ``sklearn.cluster.KMeans(m // B)``, which puts
       high-affinity (high-loss) pairs in the same cluster.
    4. Make the clusters exactly ``B`` each with :func:`balanced_assignment`: the global greedy matching of points to
       the k-means centroids by embedding distance, with capacity ``B`` per centroid.
    5. Shuffle the batch order and the order inside each batch (keyed by ``(seed, epoch)``).

    sklearn's ``random_state`` (ARPACK's start vector, k-means' initialisation) is keyed by ``(seed, epoch)`` too.

    Scale: the affinity is a dense ``m × m`` float64 matrix. With its Laplacian and ARPACK's shift-invert
    factorisation, peak memory is about ``4 · 8 m²`` bytes (≈ 13 GB at ``m = 20,000``) and time is ``O(m³)``
    (measured single-threaded: 0.7 s at ``m = 2,000``, 3.7 s at ``m = 4,000``). ``m`` above ``max_samples``
    (default 20,000) is refused: use :class:`OrderedSGDBatchSampler` (``ordered_sgd``), which is linear in ``m``.

    Args:
        num_samples, batch_size, num_processes, seed, same_view_negatives: see :class:`HighLossBatchSampler`.
        max_samples: the largest ``m`` accepted.
        eigen_solver: ``spectral_embedding``'s solver: ``None`` (ARPACK), ``"arpack"`` or ``"lobpcg"`` (often
            faster for large ``m``).
        kmeans_n_init: k-means restarts.
    """

    name = "spectral_clustering"
    DEFAULT_MAX_SAMPLES = 20_000

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_processes: int = 1,
        seed: int = 0,
        *,
        same_view_negatives: bool = True,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        eigen_solver: str | None = None,
        kmeans_n_init: int = 4,
    ) -> None:
        super().__init__(num_samples, batch_size, num_processes, seed, same_view_negatives=same_view_negatives)
        self.max_samples = _check_int("max_samples", max_samples, 2)
        if self.num_samples > self.max_samples:
            raise ValueError(
                f"spectral_clustering builds a dense {self.num_samples} × {self.num_samples} affinity "
                f"(~{4 * 8 * self.num_samples**2 / 1e9:.0f} GB at peak, O(m³) time); it accepts at most "
                f"max_samples={self.max_samples} examples. Use the 'ordered_sgd' batch selection (linear in m) "
                "instead, or raise max_samples if the machine can afford it"
            )
        if eigen_solver not in (None, "arpack", "lobpcg"):
            raise ValueError(f"eigen_solver must be None, 'arpack' or 'lobpcg', got {eigen_solver!r}")
        self.eigen_solver = eigen_solver
        self.kmeans_n_init = _check_int("kmeans_n_init", kmeans_n_init, 1)

    def _select(self, features: torch.Tensor, inverse_temperature: float, epoch: int) -> torch.Tensor:
        """``features: FloatTensor[m, 2, d]`` → ``LongTensor[m // B, B]``, the steps of the class docstring."""
        generator = keyed_generator(self.seed, self.name, epoch)
        size, num_batches = self.global_batch_size, self.num_batches
        kept = torch.randperm(self.num_samples, generator=generator)[: num_batches * size].sort().values
        if num_batches == 1:
            labels = np.zeros(kept.numel(), dtype=np.int64)
        else:
            from sklearn.cluster import KMeans
            from sklearn.manifold import spectral_embedding

            random_state = keyed_seed(self.seed, self.name, "sklearn", epoch) % (1 << 32)
            affinity = contrastive_affinity(
                features[kept.to(features.device)], inverse_temperature, same_view_negatives=self.same_view_negatives
            )
            affinity = affinity.cpu().numpy()
            embedding = spectral_embedding(
                affinity,
                n_components=num_batches,
                eigen_solver=self.eigen_solver,
                random_state=random_state,
                drop_first=False,
            )
            del affinity
            kmeans = KMeans(n_clusters=num_batches, n_init=self.kmeans_n_init, random_state=random_state)
            kmeans.fit(embedding)
            labels = balanced_assignment(kmeans.transform(embedding), size)
        order = np.argsort(labels, kind="stable")  # members of cluster 0, then cluster 1, ...
        batches = kept[torch.from_numpy(order)].view(num_batches, size)
        within = torch.rand(num_batches, size, generator=generator).argsort(dim=1)
        batches = batches.gather(1, within)
        return batches[torch.randperm(num_batches, generator=generator)]


class OrderedSGDBatchSampler(HighLossBatchSampler):
    """Ordered SGD over batches, Cho et al.'s baseline: each step trains on the highest-loss of ``k`` random batches.

    Candidates: the epoch's ``k`` random permutations ``P_0 … P_{k−1}`` of the ``m`` examples, keyed by
    ``(seed, epoch, p)``, are cut into ``m // B`` blocks of ``B`` (each permutation's last ``m mod B`` unused) and
    concatenated. Step ``s`` has the blocks ``s·k … s·k + k − 1`` as its candidates (:meth:`candidate_batches`). Each
    candidate is a uniformly random set of ``B`` distinct examples, and candidates from the same permutation are
    disjoint. Drawing costs ``k`` permutations an epoch, not ``k · m / B``.

    :meth:`update` scores every candidate with :func:`batch_contrastive_losses`. That is the batch's NT-Xent
    (``same_view_negatives=True``) or symmetric image–text InfoNCE (``False``) at ``β``, computed directly and
    batched, and equal to :func:`emc2_hf.objectives.info_nce_loss` on that batch's problem. Each step keeps the argmax
    (first on ties). There are ``m // B`` steps an epoch. An example may be in several steps' batches of an epoch,
    or in none: that is the method, since it trains on hard batches rather than on a partition. The scores are kept in
    :attr:`candidate_losses` (``FloatTensor[m // B, k]``).

    Args:
        num_samples, batch_size, num_processes, seed, same_view_negatives: see :class:`HighLossBatchSampler`.
        num_candidates: ``k ≥ 1`` random batches per step (``k = 1`` is plain random batches with replacement
            across steps).
    """

    name = "ordered_sgd"

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_processes: int = 1,
        seed: int = 0,
        num_candidates: int = 4,
        *,
        same_view_negatives: bool = True,
    ) -> None:
        super().__init__(num_samples, batch_size, num_processes, seed, same_view_negatives=same_view_negatives)
        self.num_candidates = _check_int("num_candidates", num_candidates, 1)
        self.candidate_losses: torch.Tensor | None = None

    def _permutation_blocks(self, epoch: int, permutation: int) -> torch.Tensor:
        """``LongTensor[m // B, B]``: permutation ``P_p`` of ``epoch`` cut into blocks."""
        generator = keyed_generator(self.seed, self.name, epoch, permutation)
        order = torch.randperm(self.num_samples, generator=generator)
        return order[: self.num_batches * self.global_batch_size].view(self.num_batches, self.global_batch_size)

    def candidate_batches(self, epoch: int, step: int | None = None) -> torch.Tensor:
        """The candidates of ``step`` of ``epoch``, ``LongTensor[k, B]``. With ``step=None``, those of every step,
        ``LongTensor[m // B, k, B]``."""
        epoch = _check_int("epoch", epoch, 0)
        k, num_steps = self.num_candidates, self.num_batches
        if step is None:
            blocks = torch.cat([self._permutation_blocks(epoch, p) for p in range(k)])  # [k · steps, B]
            return blocks.view(num_steps, k, self.global_batch_size)
        step = _check_int("step", step, 0)
        if step >= num_steps:
            raise ValueError(f"step {step} is past the epoch's {num_steps} steps")
        block_ids = [step * k + c for c in range(k)]
        permutations = {p: self._permutation_blocks(epoch, p) for p in sorted({b // num_steps for b in block_ids})}
        return torch.stack([permutations[block // num_steps][block % num_steps] for block in block_ids])

    def _select(self, features: torch.Tensor, inverse_temperature: float, epoch: int) -> torch.Tensor:
        """``features: FloatTensor[m, 2, d]`` → ``LongTensor[m // B, B]``: each step's highest-loss candidate."""
        candidates = self.candidate_batches(epoch)  # [steps, k, B]
        losses = batch_contrastive_losses(
            features,
            candidates.view(-1, self.global_batch_size),
            inverse_temperature,
            same_view_negatives=self.same_view_negatives,
        ).view(self.num_batches, self.num_candidates)
        self.candidate_losses = losses.cpu()
        chosen = losses.argmax(dim=1).cpu()
        return candidates[torch.arange(self.num_batches), chosen]


BATCH_SELECTIONS: dict[str, type[HighLossBatchSampler] | None] = {
    "random": None,
    "spectral_clustering": SpectralClusteringBatchSampler,
    "ordered_sgd": OrderedSGDBatchSampler,
}
"""Every batch selection by name. ``"random"`` is ``None``: keep the Trainer's own (random) sampler."""


def build_batch_sampler(
    name: str, num_samples: int, batch_size: int, num_processes: int = 1, seed: int = 0, **options: Any
) -> HighLossBatchSampler | None:
    """Construct the batch selection ``name`` (a key of :data:`BATCH_SELECTIONS`); ``None`` for ``"random"``.

    ``batch_size`` is the global batch ``B`` (per-process batch × ``num_processes``). ``options`` are the sampler's
    own keyword arguments (``num_candidates``, ``same_view_negatives``, ``max_samples``, ...). ``None`` means the
    default. An option the sampler does not take is an error that lists the ones it does take.
    """
    if name not in BATCH_SELECTIONS:
        raise ValueError(f"unknown batch selection {name!r}; choose one of {sorted(BATCH_SELECTIONS)}")
    sampler_class = BATCH_SELECTIONS[name]
    given = {key: value for key, value in options.items() if value is not None}
    if sampler_class is None:
        if given:
            raise ValueError(f"batch selection {name!r} takes no options, got {sorted(given)}")
        return None
    positional = {"self", "num_samples", "batch_size", "num_processes", "seed"}
    accepted = set(inspect.signature(sampler_class.__init__).parameters) - positional
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise ValueError(f"batch selection {name!r} does not take {unknown}; its options are {sorted(accepted)}")
    return sampler_class(num_samples, batch_size, num_processes, seed, **given)
