"""The negative cache: Gumbel-max negative sampling from stale cached features (Lindgren et al., 2021).

The baseline of the EMC² paper (Table 1, §4): every training example ``z`` keeps a cached feature ``ψ(z; θ_τ)`` of
its *unaugmented* image, written at some earlier step ``τ``. An anchor of example ``x`` draws its negative from the
softmax of ``β ⟨anchor, cache_z⟩`` over ``D_neg(x) = D \\ {x}`` with the Gumbel-max trick, the drawn example is
re-encoded with the current model (with gradient), and a fraction ``ρ`` of the cache is re-embedded every step.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..sampling.random import keyed_generator
from ..sampling.sample_state import PerSampleState
from .problem import ContrastiveProblem
from .surrogate import ContrastiveObjective

NEVER_WRITTEN = -1
"""``written_step`` of a cache entry that was never written, or written without a step."""


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``FloatTensor[shape]``: Gumbel noise ``−log(−log U)``, ``U ~ Uniform(0, 1)``, drawn on ``generator``'s device.

    ``U`` is clamped to ``[tiny, 1 − eps]`` (float32), so the noise is finite: it lies in ``[−4.5, 15.9]``.
    """
    uniform = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    info = torch.finfo(torch.float32)
    return -torch.log(-torch.log(uniform.clamp(min=info.tiny, max=1.0 - info.eps)))


class EmbeddingCache(PerSampleState):
    """One cached, L2-normalised float32 feature per training example, and the round-robin refresh position.

    Buffers (they follow ``.to(device)`` and go into ``state_dict()``, hence into every checkpoint):
        embeddings: ``FloatTensor[m, d]``, the cached features ``ψ(z; θ_τ)`` (unit rows once written; zero before).
        filled: ``BoolTensor[m]``, whether entry ``z`` was written.
        written_step: ``IntTensor[m]`` (int32), the step entry ``z`` was last written at (``NEVER_WRITTEN``: unknown).
        refresh_position: ``LongTensor[]`` (0-dim), the next entry the round-robin refresh re-embeds.

    Memory: ``4 d + 1 + 4`` bytes per example (:attr:`bytes_per_example`). On ImageNet-1k (m = 1,281,167 training
    images) at d = 128 the features alone are 1,281,167 × 128 × 4 B = 655,957,504 B ≈ 656 MB (625.6 MiB); with the
    flags and steps, 1,281,167 × 517 B = 662,363,339 B ≈ 662 MB — against EMC²'s 20 bytes per chain.

    Args:
        num_samples: ``m``, the training-set size (entries are indexed by dataset index).
        embedding_dim: ``d``, the width of the cached (projected) features.
        chunk_elements: the most logits :meth:`sample` holds at once: anchors are processed in chunks of
            ``max(1, chunk_elements // m)``, each needing about three float32 ``[chunk, m]`` temporaries (logits,
            noise, their sum). The noise drawn depends on the chunking, so keep it fixed within a run.
    """

    def __init__(self, num_samples: int, embedding_dim: int, chunk_elements: int = 1 << 24) -> None:
        super().__init__()
        if num_samples < 2:
            raise ValueError(f"the negative cache needs at least 2 training examples, got num_samples={num_samples}")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.chunk_elements = int(chunk_elements)
        self.register_buffer("embeddings", torch.zeros(num_samples, embedding_dim, dtype=torch.float32))
        self.register_buffer("filled", torch.zeros(num_samples, dtype=torch.bool))
        self.register_buffer("written_step", torch.full((num_samples,), NEVER_WRITTEN, dtype=torch.int32))
        self.register_buffer("refresh_position", torch.zeros((), dtype=torch.long))

    @property
    def num_samples(self) -> int:
        return self.embeddings.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def bytes_per_example(self) -> int:
        """``4 d`` (feature) ``+ 1`` (filled flag) ``+ 4`` (written step) bytes."""
        return sum(buffer.element_size() * buffer[0].numel() for buffer in self.buffers() if buffer.ndim > 0)

    def filled_fraction(self) -> torch.Tensor:
        """0-dim float: the fraction of entries written at least once."""
        return self.filled.float().mean()

    def read(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embeddings [k, d], filled [k], written_step [k])`` of the examples ``keys: LongTensor[k]``."""
        return self.embeddings[keys], self.filled[keys], self.written_step[keys]

    def write(self, keys: torch.Tensor, embeddings: torch.Tensor, step: int | None = None) -> None:
        """Cache ``normalise(embeddings[j])`` (float32, detached) as the feature of example ``keys[j]``.

        Args:
            keys: ``LongTensor[k]``, dataset indices (a key given twice keeps one of its rows).
            embeddings: ``[k, d]``, any float dtype.
            step: the global step the features were computed at (for the staleness metric; ``None``: unknown).
        """
        keys = keys.to(device=self.embeddings.device, dtype=torch.long).reshape(-1)
        if embeddings.ndim != 2 or embeddings.shape != (keys.numel(), self.embedding_dim):
            raise ValueError(
                f"expected embeddings of shape [{keys.numel()}, {self.embedding_dim}] (one row per key, the cache's "
                f"width), got {tuple(embeddings.shape)}"
            )
        if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= self.num_samples):
            raise ValueError(f"cache keys must be dataset indices in [0, {self.num_samples}), got {keys.tolist()[:8]}")
        features = F.normalize(embeddings.detach().float(), dim=-1).to(self.embeddings.device)
        self.embeddings[keys] = features
        self.filled[keys] = True
        self.written_step[keys] = NEVER_WRITTEN if step is None else int(step)

    def refresh_count(self, refresh_fraction: float) -> int:
        """``max(1, ⌈ρ m⌉)`` entries per step (in exact arithmetic on ``ρ``'s value, so ``ρ = 0.3, m = 10`` gives 3).

        With this count every entry is re-embedded once per ``⌈m / ⌈ρ m⌉⌉ ≤ ⌈1/ρ⌉`` steps.
        """
        if not 0 < refresh_fraction <= 1:
            raise ValueError(f"--cache_refresh_fraction must be in (0, 1], got {refresh_fraction}")
        return min(self.num_samples, max(1, math.ceil(Fraction(refresh_fraction) * self.num_samples)))

    def next_refresh_keys(self, count: int) -> torch.Tensor:
        """``LongTensor[count]``: entries ``(position + j) mod m``, ``j < count``; the position advances by ``count``.

        Args:
            count: ``0 ≤ count ≤ m`` (use :meth:`refresh_count`).
        """
        if not 0 <= count <= self.num_samples:
            raise ValueError(f"refresh count must be in [0, m = {self.num_samples}], got {count}")
        position = self.refresh_position
        keys = (position + torch.arange(count, device=position.device)) % self.num_samples
        self.refresh_position.copy_((position + count) % self.num_samples)
        return keys

    @torch.no_grad()
    def sample(
        self,
        anchor_features: torch.Tensor,
        anchor_keys: torch.Tensor,
        inverse_temperature: float,
        num_negatives: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Draw ``n`` distinct negatives per anchor from ``softmax_z(β ⟨anchor, cache_z⟩)`` over the allowed entries.

        Gumbel-top-n: with i.i.d. Gumbel noise ``G_az``, the indices of the ``n`` largest ``β ⟨a, cache_z⟩ + G_az`` are
        a draw without replacement (Plackett–Luce) from that softmax; the first (the arg-max) is exactly distributed
        as the softmax (Gumbel-max). Excluded (logit ``−∞``): the anchor's own example ``z = anchor_key``, and entries
        not yet written. Cost: ``A m d`` multiply-adds, ``A m`` noise draws; memory: about three float32
        ``[chunk, m]`` temporaries, ``chunk = max(1, chunk_elements // m)`` anchors at a time (A·m floats unchunked).

        Args:
            anchor_features: ``[A, d]``, the anchors' current features (detached; normalised here again).
            anchor_keys: ``LongTensor[A]``, each anchor's dataset index.
            inverse_temperature: ``β``.
            num_negatives: ``n ≥ 1``.
            generator: the source of the noise, drawn on the generator's device (moved to the cache's device).

        Returns:
            ``LongTensor[A, n]`` of dataset indices (on the cache's device), in decreasing perturbed score.
        """
        device = self.embeddings.device
        if anchor_features.ndim != 2 or anchor_features.shape[1] != self.embedding_dim:
            raise ValueError(
                f"expected anchor features of shape [A, {self.embedding_dim}], got {tuple(anchor_features.shape)}"
            )
        anchors = F.normalize(anchor_features.detach().float(), dim=-1).to(device)
        anchor_keys = anchor_keys.to(device=device, dtype=torch.long).reshape(-1)
        if anchor_keys.numel() != anchors.shape[0]:
            raise ValueError(f"expected one key per anchor ({anchors.shape[0]}), got {anchor_keys.numel()}")
        available = self.filled.sum() - self.filled[anchor_keys].long()  # [A]: allowed entries per anchor
        if anchors.shape[0] and int(available.min()) < num_negatives:
            raise ValueError(
                f"an anchor has only {int(available.min())} filled cache entries other than its own example, fewer "
                f"than the {num_negatives} negative(s) to draw: fill the cache (write every example) before sampling"
            )
        chunk = max(1, self.chunk_elements // self.num_samples)
        samples = []
        for start in range(0, anchors.shape[0], chunk):
            rows, keys = anchors[start : start + chunk], anchor_keys[start : start + chunk]
            logits = inverse_temperature * (rows @ self.embeddings.t())  # [chunk, m]
            logits.masked_fill_(~self.filled[None, :], float("-inf"))
            logits.scatter_(1, keys[:, None], float("-inf"))
            logits += gumbel_noise(tuple(logits.shape), generator).to(device)
            samples.append(logits.topk(num_negatives, dim=1).indices)
        if not samples:
            return torch.empty(0, num_negatives, dtype=torch.long, device=device)
        return torch.cat(samples)


class NegativeCacheObjective(ContrastiveObjective):
    r"""The negative-cache estimate of eq. (11)'s gradient (Lindgren et al., 2021), as run in the EMC² paper.

    **Estimator.** Eq. (11)'s negative term is ``E_{z ~ P_a}[∇s(a, z)]`` with ``P_a(z) ∝ exp(β s(a, z))`` over
    ``D_neg(x) = D \ {x}``: the unaugmented images of every other example. The cache holds stale features
    ``ψ(z; θ_τ)`` of all of them; each anchor draws ``n`` negatives ``z*_1 … z*_n`` without replacement from the
    softmax of ``β ⟨ψ(a; θ), ψ(z; θ_τ)⟩`` with the Gumbel-max trick (:meth:`EmbeddingCache.sample`), the caller
    re-encodes them with the current model and autograd, and they enter the problem as state columns. The weights

        w_ac = #{j : z*_j = key_c} / n   on state column c,        0 on the batch's own columns,

    make the surrogate ``β [Σ_c w_ac s(a, c) − s(a, p(a))]``, whose gradient is

        β ( (1/n) Σ_j ∇s(a, z*_j) − ∇s(a, p(a)) )          (n = 1:  β (∇s(a, z*) − ∇s(a, p(a)))),

    eq. (11)'s gradient with the softmax over ``D \ {x}`` approximated from cached features. Only the cache
    negatives are used — none of the batch's own views — as in the paper's baseline (one negative per anchor,
    ``B`` extra encodes per iteration). The bias is the cache's staleness: with every entry re-embedded by the current
    model just before sampling (``ρ = 1``) and ``n = 1`` the estimate is unbiased for the unaugmented-negative global
    loss. For ``n > 1`` the draws are without replacement, so ``(1/n) Σ_j`` weights the likely negatives less than the
    softmax does (inclusion probabilities are not ``n P_a``): a flattened estimate; the paper runs ``n = 1``.

    **Cost.** Memory ``O(m d)``: ``4 d + 5`` bytes per example (≈ 662 MB on ImageNet-1k at d = 128, see
    :class:`EmbeddingCache`). Compute per step: ``⌈ρ m⌉`` forward encodes without gradient (the refresh), ``A n``
    with gradient (at most; the distinct sampled negatives), and ``A m d`` multiply-adds for the sampling.

    **Each step** (the trainer; every process must hold the same cache, so encoded features are all-gathered). Before
    step 0 the cache is filled (every example written once).

    1. at ``micro_step == 0``: ``keys = refresh_keys(step)``; encode their unaugmented images without gradient;
       ``write_cache(keys, features)``;
    2. ``samples = sample_negatives(anchor_features.detach(), anchor_keys, step, micro_step)`` — ``[A, n]``;
    3. encode the unaugmented images of ``negatives_to_encode(samples)`` with gradient (their detached features may
       be written back with :meth:`write_cache`); pass them as ``state_embeddings/state_keys`` (``state_views =
       NO_STATE``, ``start_keys = samples[:, 0]``, ``start_views = NO_STATE``; the weights come from the samples,
       not from the problem's ownership mask);
    4. ``objective(problem)`` → loss; backward.

    Args:
        num_samples: ``m``, the training-set size.
        inverse_temperature: ``β``.
        embedding_dim: ``d``, the width of the projected features the cache stores.
        refresh_fraction: ``ρ ∈ (0, 1]``, the fraction of the cache re-embedded per step (paper: 0.01024 at b = 32
            and 0.1 at b = 256 on STL-10).
        num_negatives: ``n ≥ 1`` cache negatives per anchor (paper: 1).
        seed: key of the random numbers (the draw of step ``t`` is keyed by ``(seed, name, "cache", t, micro_step)``).
    """

    name = "negative_cache"
    title = "Negative cache (Gumbel-max)"
    citation = (
        "@inproceedings{lindgren2021negativecache,\n  title={Efficient Training of Retrieval Models using Negative "
        "Cache},\n  author={Lindgren, Erik and Reddi, Sashank and Guo, Ruiqi and Kumar, Sanjiv},\n  "
        "booktitle={Advances in Neural Information Processing Systems},\n  volume={34},\n  pages={4134--4146},\n"
        "  year={2021}\n}"
    )
    training_arguments: ClassVar[dict[str, str]] = {
        "refresh_fraction": "cache_refresh_fraction",
        "num_negatives": "cache_negatives",
    }
    reencodes_cache_negatives: ClassVar[bool] = True
    """Whether the caller must encode the sampled cache negatives (their unaugmented images) as state columns."""

    def __init__(
        self,
        num_samples: int,
        inverse_temperature: float,
        embedding_dim: int = 128,
        refresh_fraction: float = 0.01,
        num_negatives: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(inverse_temperature, seed)
        if not 0 < refresh_fraction <= 1:
            raise ValueError(f"--cache_refresh_fraction must be in (0, 1], got {refresh_fraction}")
        if int(num_negatives) != num_negatives or num_negatives < 1:
            raise ValueError(f"--cache_negatives must be >= 1, got {num_negatives}")
        if num_negatives > num_samples - 1:
            raise ValueError(
                f"--cache_negatives ({num_negatives}) must be at most the {num_samples - 1} other training examples"
            )
        self.refresh_fraction = float(refresh_fraction)
        self.num_negatives = int(num_negatives)
        self.cache = EmbeddingCache(num_samples, embedding_dim)
        self._pending_negatives: torch.Tensor | None = None
        self._pending_anchor_keys: torch.Tensor | None = None
        self._pending_scores: torch.Tensor | None = None
        self._pending_staleness: torch.Tensor | None = None
        self._last_refresh_step: int | None = None

    @property
    def refresh_count(self) -> int:
        """``⌈ρ m⌉``: the entries re-embedded per step."""
        return self.cache.refresh_count(self.refresh_fraction)

    def _keys(self, *extra: int | str) -> tuple[int | str, ...]:
        stream = () if self.stream is None else (self.stream,)
        return (self.seed, self.name, *stream, *extra)

    def sample_negatives(
        self,
        anchor_features: torch.Tensor,
        anchor_keys: torch.Tensor,
        step: int,
        micro_step: int = 0,
        inverse_temperature: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw each anchor's cache negatives for this (micro-)step; keep them for the next :meth:`negative_weights`.

        The generator is keyed by ``(seed, name, "cache", step, micro_step)`` on the cache's device, so every process
        (holding the same cache and anchors) and every resumed run draws the same negatives.

        Args:
            anchor_features: ``[A, d]``, the anchors' current projected features (detached), in the problem's anchor
                order.
            anchor_keys: ``LongTensor[A]``, their dataset indices (must equal the problem's ``anchor_keys``).
            step: the global optimisation step.
            micro_step: the micro-batch within the step under gradient accumulation.
            inverse_temperature: ``β`` to sample with (a learned scale's current value); default the objective's.

        Returns:
            ``LongTensor[A, n]``, dataset indices of the negatives (distinct per anchor, never the anchor's own).
        """
        beta = self.inverse_temperature if inverse_temperature is None else float(inverse_temperature)
        device = self.cache.embeddings.device
        generator = keyed_generator(*self._keys("cache", step, micro_step), device=device)
        anchor_keys = anchor_keys.to(device=device, dtype=torch.long).reshape(-1)
        samples = self.cache.sample(anchor_features, anchor_keys, beta, self.num_negatives, generator)
        anchors = F.normalize(anchor_features.detach().float(), dim=-1).to(device)
        self._pending_negatives = samples
        self._pending_anchor_keys = anchor_keys
        self._pending_scores = torch.einsum("ad,and->an", anchors, self.cache.embeddings[samples])
        written = self.cache.written_step[samples]
        known = written != NEVER_WRITTEN
        self._pending_staleness = (
            (step - written[known].float()).mean() if bool(known.any()) else None
        )  # steps since the sampled entries were written
        return samples

    @staticmethod
    def negatives_to_encode(samples: torch.Tensor) -> torch.Tensor:
        """``LongTensor[k]``: the distinct dataset indices of ``samples [A, n]``, sorted — the images to re-encode."""
        return torch.unique(samples)

    def negative_weights(
        self, problem: ContrastiveProblem, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``w_ac = #{j : z*_j = key_c} / n`` on the state columns (the first column of each key), 0 elsewhere.

        ``generator`` is unused: the negatives were drawn by :meth:`sample_negatives`, whose draw this consumes.
        """
        samples, keys = self._pending_negatives, self._pending_anchor_keys
        if samples is None or keys is None:
            raise RuntimeError(
                "NegativeCacheObjective: call sample_negatives(anchor_features, anchor_keys, step, micro_step) before "
                "each evaluation of the objective, and pass the re-encoded negatives as state columns"
            )
        self._pending_negatives = self._pending_anchor_keys = None
        device = problem.similarities.device
        samples, keys = samples.to(device), keys.to(device)
        if keys.shape != problem.anchor_keys.shape or bool((keys != problem.anchor_keys).any()):
            raise ValueError(
                "NegativeCacheObjective: the negatives were sampled for other anchors than the problem's: call "
                "sample_negatives with the problem's anchor_keys, in its order (duplicate images dropped)"
            )
        num_batch = problem.num_batch_columns
        state_keys = problem.candidate_keys[num_batch:]
        sorted_keys, order = torch.sort(state_keys, stable=True)
        position = torch.searchsorted(sorted_keys, samples).clamp(max=max(state_keys.numel() - 1, 0))
        found = sorted_keys[position] == samples if state_keys.numel() else torch.zeros_like(samples, dtype=torch.bool)
        if not bool(found.all()):
            missing = sorted(set(samples[~found].tolist()))
            raise ValueError(
                f"NegativeCacheObjective: the sampled cache negatives {missing[:8]} are not state columns of the "
                "problem; encode negatives_to_encode(samples) (their unaugmented images) with the current model and "
                "pass them as state_embeddings / state_keys"
            )
        columns = num_batch + order[position]  # [A, n]
        weights = torch.zeros_like(problem.similarities, dtype=torch.float32)
        weights.scatter_add_(1, columns, torch.full(samples.shape, 1.0 / samples.shape[1], device=device))
        metrics = {"cache_filled_fraction": self.cache.filled_fraction().to(device)}
        if self._pending_scores is not None:
            current = problem.similarities.detach().float().gather(1, columns)
            metrics["cache_similarity_error"] = (current - self._pending_scores.to(device)).abs().mean()
        if self._pending_staleness is not None:
            metrics["cache_staleness_steps"] = self._pending_staleness.to(device)
        self._pending_scores = self._pending_staleness = None
        return weights, metrics

    def refresh_keys(self, step: int) -> torch.Tensor:
        """``LongTensor[⌈ρ m⌉]``: the round-robin entries to re-embed after step ``step`` (advances the position).

        The keys depend only on the stored position, so every process refreshes the same entries and a resumed run
        continues where the checkpoint left off. ``step`` is recorded as the write step of the next
        :meth:`write_cache`.
        """
        self._last_refresh_step = int(step)
        return self.cache.next_refresh_keys(self.refresh_count)

    def write_cache(self, keys: torch.Tensor, embeddings: torch.Tensor, step: int | None = None) -> None:
        """Write the features ``embeddings [k, d]`` of examples ``keys [k]`` (unaugmented images) into the cache.

        ``step`` defaults to the step of the last :meth:`refresh_keys` call (``None`` before any).
        """
        self.cache.write(keys, embeddings, self._last_refresh_step if step is None else step)

    def get_config_dict(self) -> dict[str, float | int | str]:
        return {
            **super().get_config_dict(),
            "embedding_dim": self.cache.embedding_dim,
            "refresh_fraction": self.refresh_fraction,
            "num_negatives": self.num_negatives,
        }

    def card_settings(self, global_batch_size: int) -> dict[str, float | int | str]:
        megabytes = self.cache.bytes_per_example * self.cache.num_samples / 1e6
        return {
            **super().card_settings(global_batch_size),
            "cache_refreshes_per_step": self.refresh_count,
            "cache_encodes_per_step": f"{self.refresh_count} (no gradient) + up to "
            f"{2 * global_batch_size * self.num_negatives} (with gradient)",
            "cache_memory": f"{megabytes:.1f} MB ({self.cache.bytes_per_example} B × {self.cache.num_samples})",
        }
