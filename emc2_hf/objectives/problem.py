"""The layout-free contrastive problem every objective takes, and its builder for two augmented views per image.

A problem is ``A`` anchors against ``C`` candidates: the similarities ``s_ac``, the positive column of each anchor,
which candidates are each anchor's negatives, and the keys that per-sample state is indexed by — the dataset index
of every anchor's and candidate's example, the state *slot* an anchor uses (which view of its example it is) and a
*view key* per candidate that says how to re-create exactly that candidate (an augmentation seed, or the index of a
fixed augmentation). Objectives only read this structure, so the same code serves two views of an image and (later)
image–text pairs.

**Two views** (:func:`two_view_problem`, SimCLR's layout, paper Fig. 2). Anchor/candidate ``k < b`` is view 1 of the
batch's image ``k`` and ``k + b`` is its view 2. Every view is an anchor; its positive is the other view of its
image; its negatives are the ``2b − 2`` views of the other images. Optionally ``k`` *state columns* follow the views:
re-encoded EMC² chain states, each a negative only of the anchors whose chain starts on it (see
:class:`~emc2_hf.objectives.EMC2Objective`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NO_STATE = -1
"""Key of an empty chain state (a chain that has not visited a negative yet) and of an unknown view."""


@dataclass
class ContrastiveProblem:
    """Anchors, candidates and the keys of per-sample state.

    Attributes:
        similarities: ``FloatTensor[A, C]``, cosine similarities ``s_ac`` of L2-normalised float32 features
            (differentiable).
        positive_columns: ``LongTensor[A]``, the column of each anchor's positive.
        negative_mask: ``BoolTensor[A, C]``, each anchor's negatives (its own example's candidates never are).
        anchor_keys: ``LongTensor[A]``, dataset index of each anchor's example (the key of per-sample state).
        anchor_slots: ``LongTensor[A]``, which state slot of its example the anchor uses (two views: the view's
            augmentation slot, so each view of an image keeps its own chain).
        candidate_keys: ``LongTensor[C]``, dataset index of each candidate's example.
        candidate_views: ``LongTensor[C]``, the view key of each candidate: what re-creates it (``NO_STATE`` if
            unknown).
        num_batch_columns: columns ``0 … n − 1`` are the batch's own candidates; columns ``n …`` are state columns.
        self_columns: ``LongTensor[A]``, the column that is the anchor itself (``-1`` when anchors are not
            candidates), excluded from InfoNCE's denominator.
        start_keys: ``LongTensor[A]`` or ``None``, the chain state each anchor starts from as delivered with the batch
            (dataset index; ``NO_STATE`` for an empty chain). ``None``: objectives read their own state.
        start_views: ``LongTensor[A]`` or ``None``, the view keys of those states.
        chain_anchors: ``BoolTensor[A]`` or ``None``, which anchors run their chain this step (EMC²'s
            ``chain_fraction``); ``None``: all of them.
        num_duplicates_dropped: images dropped because their dataset index was already in the batch.
    """

    similarities: torch.Tensor
    positive_columns: torch.Tensor
    negative_mask: torch.Tensor
    anchor_keys: torch.Tensor
    anchor_slots: torch.Tensor
    candidate_keys: torch.Tensor
    candidate_views: torch.Tensor
    num_batch_columns: int
    self_columns: torch.Tensor
    start_keys: torch.Tensor | None = None
    start_views: torch.Tensor | None = None
    chain_anchors: torch.Tensor | None = None
    num_duplicates_dropped: int = 0

    @property
    def num_anchors(self) -> int:
        return self.similarities.shape[0]

    @property
    def batch_negative_mask(self) -> torch.Tensor:
        """``BoolTensor[A, n]``, each anchor's negatives among the batch's own candidates (state columns left out)."""
        return self.negative_mask[:, : self.num_batch_columns]

    @property
    def batch_similarities(self) -> torch.Tensor:
        """``FloatTensor[A, n]``, the similarities to the batch's own candidates."""
        return self.similarities[:, : self.num_batch_columns]

    @property
    def info_nce_mask(self) -> torch.Tensor:
        """``BoolTensor[A, n]``: InfoNCE's denominator, the batch negatives and the positive."""
        mask = self.batch_negative_mask.clone()
        mask[torch.arange(self.num_anchors, device=mask.device), self.positive_columns] = True
        return mask


def states_to_encode(
    start_keys: torch.Tensor,
    start_views: torch.Tensor,
    batch_keys: torch.Tensor,
    batch_views: torch.Tensor,
    chain_anchors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct chain states that must be encoded because the batch does not contain them.

    Args:
        start_keys: ``LongTensor[A]``, dataset index of each anchor's chain state (``NO_STATE``: empty chain).
        start_views: ``LongTensor[A]``, their view keys.
        batch_keys: ``LongTensor[n]``, dataset index of each of the batch's candidates.
        batch_views: ``LongTensor[n]``, their view keys.
        chain_anchors: ``BoolTensor[A]``, the anchors that run their chain this step (default: all).

    Returns:
        ``(keys [k], views [k])``: every non-empty ``(start key, start view)`` that is not a batch candidate, once,
        sorted by key then view.
    """
    in_batch = ((start_keys[:, None] == batch_keys[None, :]) & (start_views[:, None] == batch_views[None, :])).any(1)
    needed = (start_keys != NO_STATE) & ~in_batch
    if chain_anchors is not None:
        needed &= chain_anchors.to(needed.device)
    if not bool(needed.any()):
        empty = start_keys.new_empty(0)
        return empty, empty
    pairs = torch.unique(torch.stack([start_keys[needed], start_views[needed]], dim=1), dim=0)
    return pairs[:, 0].contiguous(), pairs[:, 1].contiguous()


def _first_occurrences(dataset_indices: torch.Tensor) -> torch.Tensor:
    """``LongTensor``: positions of the first occurrence of every distinct value, in batch order."""
    num = dataset_indices.numel()
    equal = dataset_indices[:, None] == dataset_indices[None, :]
    earlier = torch.tril(equal, diagonal=-1).any(dim=1)
    return torch.arange(num, device=dataset_indices.device)[~earlier]


def two_view_problem(
    embeddings: torch.Tensor,
    dataset_indices: torch.Tensor,
    *,
    view_keys: torch.Tensor | None = None,
    view_slots: torch.Tensor | None = None,
    state_embeddings: torch.Tensor | None = None,
    state_keys: torch.Tensor | None = None,
    state_views: torch.Tensor | None = None,
    start_keys: torch.Tensor | None = None,
    start_views: torch.Tensor | None = None,
    chain_anchors: torch.Tensor | None = None,
) -> ContrastiveProblem:
    """The problem of ``b`` images seen through two views, ``embeddings: [2b, d]`` (view 1 of all, then view 2).

    Embeddings are upcast to float32 and L2-normalised, so objectives run in float32 under autocast. An image whose
    dataset index appeared earlier in the batch (a padded distributed sampler can repeat one at the end of an epoch)
    is dropped with both its views — otherwise its copy would be its own negative and its chains would be written
    twice — and counted in ``num_duplicates_dropped``.

    Args:
        embeddings: ``[2b, d]``, the views (anchors and the batch's candidates), any float dtype.
        dataset_indices: ``LongTensor[b]``.
        view_keys: ``LongTensor[2b]``, what re-creates each view (the collator's augmentation seed, or a fixed
            augmentation's index). Default: the view slot, i.e. view ``v`` of an image is always the same view.
        view_slots: ``LongTensor[2b]``, the state slot of each view (default ``0`` for view 1, ``1`` for view 2).
        state_embeddings: ``[k, d]``, re-encoded chain states, appended as state columns.
        state_keys: ``LongTensor[k]``, their dataset indices.
        state_views: ``LongTensor[k]``, their view keys.
        start_keys: ``LongTensor[2b]``, the chain state of each view as delivered with the batch (optional).
        start_views: ``LongTensor[2b]``, its view key (with ``start_keys``).
        chain_anchors: ``BoolTensor[2b]``, which views run their chain this step (default: all).
    """
    num_views = embeddings.shape[0]
    num_images = dataset_indices.numel()
    if embeddings.ndim != 2 or num_views != 2 * num_images:
        raise ValueError(
            f"expected embeddings for 2 views of each of the {num_images} images (shape [{2 * num_images}, d]), "
            f"got shape {tuple(embeddings.shape)}"
        )
    if (state_embeddings is None) != (state_keys is None) or (state_keys is None) != (state_views is None):
        raise ValueError("state_embeddings, state_keys and state_views go together: pass all three or none")
    if (start_keys is None) != (start_views is None):
        raise ValueError("start_keys and start_views go together: pass both or neither")
    device = embeddings.device
    dataset_indices = dataset_indices.to(device=device, dtype=torch.long)
    slots = torch.arange(2, device=device).repeat_interleave(num_images)
    view_slots = slots if view_slots is None else view_slots.to(device=device, dtype=torch.long)
    view_keys = view_slots if view_keys is None else view_keys.to(device=device, dtype=torch.long)

    kept = _first_occurrences(dataset_indices)
    num_dropped = num_images - kept.numel()
    if num_dropped:
        rows = torch.cat([kept, kept + num_images])
        embeddings, dataset_indices = embeddings[rows], dataset_indices[kept]
        view_keys, view_slots = view_keys[rows], view_slots[rows]
        if start_keys is not None:
            start_keys, start_views = start_keys.to(device)[rows], start_views.to(device)[rows]
        if chain_anchors is not None:
            chain_anchors = chain_anchors.to(device)[rows]
        num_images = kept.numel()
        num_views = 2 * num_images
    if num_images < 2:
        raise ValueError(
            f"a batch of {num_images} distinct image leaves its anchors without negatives; contrastive training "
            "needs at least 2 images per batch (raise per_device_train_batch_size or keep dataloader_drop_last=True)"
        )

    anchors = F.normalize(embeddings.float(), dim=-1)
    anchor_keys = dataset_indices.repeat(2)
    candidate_keys, candidate_views, candidates = anchor_keys, view_keys, anchors
    negative_mask = anchor_keys[:, None] != anchor_keys[None, :]
    if state_embeddings is not None:
        state_keys = state_keys.to(device=device, dtype=torch.long)
        state_views = state_views.to(device=device, dtype=torch.long)
        if state_embeddings.ndim != 2 or state_embeddings.shape[0] != state_keys.numel():
            raise ValueError(
                f"state_embeddings must be [k = {state_keys.numel()}, d] (one row per state key), got shape "
                f"{tuple(state_embeddings.shape)}"
            )
        if start_keys is None:
            raise ValueError("state columns need the start_keys / start_views of the anchors that own them")
        owners = (start_keys.to(device)[:, None] == state_keys[None, :]) & (
            start_views.to(device)[:, None] == state_views[None, :]
        )
        owners &= anchor_keys[:, None] != state_keys[None, :]
        if chain_anchors is not None:
            owners &= chain_anchors.to(device=device, dtype=torch.bool)[:, None]
        candidates = torch.cat([anchors, F.normalize(state_embeddings.float(), dim=-1)])
        candidate_keys = torch.cat([anchor_keys, state_keys])
        candidate_views = torch.cat([view_keys, state_views])
        negative_mask = torch.cat([negative_mask, owners], dim=1)
    positions = torch.arange(num_views, device=device)
    return ContrastiveProblem(
        similarities=anchors @ candidates.t(),
        positive_columns=(positions + num_images) % num_views,
        negative_mask=negative_mask,
        anchor_keys=anchor_keys,
        anchor_slots=view_slots,
        candidate_keys=candidate_keys,
        candidate_views=candidate_views,
        num_batch_columns=num_views,
        self_columns=positions,
        start_keys=None if start_keys is None else start_keys.to(device=device, dtype=torch.long),
        start_views=None if start_views is None else start_views.to(device=device, dtype=torch.long),
        chain_anchors=None if chain_anchors is None else chain_anchors.to(device=device, dtype=torch.bool),
        num_duplicates_dropped=num_dropped,
    )
