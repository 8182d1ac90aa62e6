"""The layout-free contrastive problem every objective takes, and its builder for two augmented views per image.

A problem is ``A`` anchors against ``C`` candidates: the similarities ``s_ac``, the positive column of each anchor,
which candidates are each anchor's negatives, and the keys that per-sample state is indexed by — the dataset index
of every anchor's and candidate's example, the state *slot* an anchor uses (which view of its example it is) and a
*view key* per candidate that says how to re-create exactly that candidate (an augmentation seed, or the index of a
fixed augmentation) — and the scale ``β`` (a float, or a learned tensor such as CLIP's ``exp(logit_scale)``).
Objectives only read this structure, so the same code serves two views of an image and image–text pairs.

**Two views** (:func:`two_view_problem`, SimCLR's layout, paper Fig. 2). Anchor/candidate ``k < b`` is view 1 of the
batch's image ``k`` and ``k + b`` is its view 2. Every view is an anchor; its positive is the other view of its
image; its negatives are the ``2b − 2`` views of the other images. Optionally ``k`` *state columns* follow the views:
re-encoded EMC² chain states, each a negative only of the anchors whose chain starts on it (see
:class:`~emc2_hf.objectives.EMC2Objective`).

**Image–text pairs** (:func:`image_text_problems`, CLIP's layout). A batch of ``b`` pairs gives two problems:
image ``k`` is an anchor whose candidates are the ``b`` texts (positive: text ``k``), and text ``k`` is an anchor
whose candidates are the ``b`` images (positive: image ``k``). Anchors are not candidates (no self column); the
negatives of an anchor are the other pairs' texts (or images). State columns are re-encoded texts (image→text) or
images (text→image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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
        inverse_temperature: ``β`` for this problem — a float or a 0-dim tensor (a learned scale, differentiable),
            or ``None`` for the objective's own fixed ``inverse_temperature``. Negative weights and chain acceptances
            use its current (detached) value; the surrogate differentiates through it.
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
    inverse_temperature: float | torch.Tensor | None = None

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


def _check_state_arguments(state_embeddings, state_keys, state_views, start_keys, start_views) -> None:
    if (state_embeddings is None) != (state_keys is None) or (state_keys is None) != (state_views is None):
        raise ValueError("state_embeddings, state_keys and state_views go together: pass all three or none")
    if (start_keys is None) != (start_views is None):
        raise ValueError("start_keys and start_views go together: pass both or neither")


def _state_columns(
    anchor_keys: torch.Tensor,
    state_embeddings: torch.Tensor,
    state_keys: torch.Tensor,
    state_views: torch.Tensor,
    start_keys: torch.Tensor | None,
    start_views: torch.Tensor | None,
    chain_anchors: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(normalised state features [k, d], keys [k], views [k], owners BoolTensor[A, k])``: state column ``j`` is a
    negative only of the anchors whose chain starts on it (and never of its own example's anchors)."""
    device = anchor_keys.device
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
    return F.normalize(state_embeddings.float(), dim=-1), state_keys, state_views, owners


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
    inverse_temperature: float | torch.Tensor | None = None,
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
        inverse_temperature: ``β`` of this problem (float or 0-dim tensor; default: the objective's).
    """
    num_views = embeddings.shape[0]
    num_images = dataset_indices.numel()
    if embeddings.ndim != 2 or num_views != 2 * num_images:
        raise ValueError(
            f"expected embeddings for 2 views of each of the {num_images} images (shape [{2 * num_images}, d]), "
            f"got shape {tuple(embeddings.shape)}"
        )
    _check_state_arguments(state_embeddings, state_keys, state_views, start_keys, start_views)
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
        state_features, state_keys, state_views, owners = _state_columns(
            anchor_keys, state_embeddings, state_keys, state_views, start_keys, start_views, chain_anchors
        )
        candidates = torch.cat([anchors, state_features])
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
        inverse_temperature=inverse_temperature,
    )


class ImageTextProblems(NamedTuple):
    """The two directions of an image–text batch: image anchors over texts, text anchors over images."""

    image_to_text: ContrastiveProblem
    text_to_image: ContrastiveProblem


def cross_modal_problem(
    anchor_embeddings: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    dataset_indices: torch.Tensor,
    *,
    candidate_views: torch.Tensor | None = None,
    anchor_slots: torch.Tensor | None = None,
    state_embeddings: torch.Tensor | None = None,
    state_keys: torch.Tensor | None = None,
    state_views: torch.Tensor | None = None,
    start_keys: torch.Tensor | None = None,
    start_views: torch.Tensor | None = None,
    chain_anchors: torch.Tensor | None = None,
    inverse_temperature: float | torch.Tensor | None = None,
) -> ContrastiveProblem:
    """One direction of ``b`` pairs: anchor ``k`` (e.g. image ``k``) against the ``b`` candidates of the other
    modality (e.g. texts), positive ``k``, negatives the other pairs' candidates (and owned state columns).

    Pairs whose dataset index appeared earlier in the batch are dropped. Features are upcast to float32 and
    L2-normalised, so ``similarities = normalise(anchors) · normalise(candidates)ᵀ``: ``β`` times it is CLIP's
    ``logits_per_image`` (image anchors) or ``logits_per_text`` (text anchors).

    Args:
        anchor_embeddings: ``[b, d]``.
        candidate_embeddings: ``[b, d]`` (row ``k`` is the positive of anchor ``k``).
        dataset_indices: ``LongTensor[b]``, the pair's dataset index (the key of per-sample state).
        candidate_views: ``LongTensor[b]``, what re-creates each candidate (a text: its caption index; an image: its
            augmentation key). Default ``0``: every example has one candidate.
        anchor_slots: ``LongTensor[b]``, which of its example's chains each anchor uses (text anchors: the caption
            index, so each caption keeps its own chain; default ``0``).
        state_embeddings, state_keys, state_views: ``[k, d]``, ``LongTensor[k]`` ×2, re-encoded chain states (of the
            candidates' modality), appended as state columns.
        start_keys, start_views: ``LongTensor[b]``, each anchor's chain state as delivered with the batch.
        chain_anchors: ``BoolTensor[b]``, which anchors run their chain this step (default: all).
        inverse_temperature: ``β`` (float or 0-dim tensor, e.g. ``exp(logit_scale)``; default: the objective's).
    """
    num_pairs = dataset_indices.numel()
    if anchor_embeddings.ndim != 2 or candidate_embeddings.ndim != 2:
        raise ValueError(
            f"expected anchor and candidate features of shape [b, d], got {tuple(anchor_embeddings.shape)} and "
            f"{tuple(candidate_embeddings.shape)}"
        )
    if anchor_embeddings.shape[0] != num_pairs or candidate_embeddings.shape[0] != num_pairs:
        raise ValueError(
            f"expected one anchor and one candidate per pair ({num_pairs} dataset indices), got "
            f"{anchor_embeddings.shape[0]} anchors and {candidate_embeddings.shape[0]} candidates"
        )
    if anchor_embeddings.shape[1] != candidate_embeddings.shape[1]:
        raise ValueError(
            f"anchor and candidate features must have the same width (the shared projection), got "
            f"{anchor_embeddings.shape[1]} and {candidate_embeddings.shape[1]}"
        )
    _check_state_arguments(state_embeddings, state_keys, state_views, start_keys, start_views)
    device = anchor_embeddings.device
    dataset_indices = dataset_indices.to(device=device, dtype=torch.long)
    zeros = torch.zeros_like(dataset_indices)
    candidate_views = zeros if candidate_views is None else candidate_views.to(device=device, dtype=torch.long)
    anchor_slots = zeros if anchor_slots is None else anchor_slots.to(device=device, dtype=torch.long)
    kept = _first_occurrences(dataset_indices)
    num_dropped = num_pairs - kept.numel()
    if num_dropped:
        anchor_embeddings, candidate_embeddings = anchor_embeddings[kept], candidate_embeddings[kept]
        dataset_indices, candidate_views = dataset_indices[kept], candidate_views[kept]
        anchor_slots = anchor_slots[kept]
        if start_keys is not None:
            start_keys, start_views = start_keys.to(device)[kept], start_views.to(device)[kept]
        if chain_anchors is not None:
            chain_anchors = chain_anchors.to(device)[kept]
        num_pairs = kept.numel()
    if num_pairs < 2:
        raise ValueError(
            f"a batch of {num_pairs} distinct pair leaves its anchors without negatives; contrastive training needs "
            "at least 2 pairs per batch (raise per_device_train_batch_size or keep dataloader_drop_last=True)"
        )
    anchors = F.normalize(anchor_embeddings.float(), dim=-1)
    candidates = F.normalize(candidate_embeddings.float(), dim=-1)
    candidate_keys = dataset_indices
    negative_mask = dataset_indices[:, None] != dataset_indices[None, :]
    if state_embeddings is not None:
        state_features, state_keys, state_views, owners = _state_columns(
            dataset_indices, state_embeddings, state_keys, state_views, start_keys, start_views, chain_anchors
        )
        candidates = torch.cat([candidates, state_features])
        candidate_keys = torch.cat([dataset_indices, state_keys])
        candidate_views = torch.cat([candidate_views, state_views])
        negative_mask = torch.cat([negative_mask, owners], dim=1)
    positions = torch.arange(num_pairs, device=device)
    return ContrastiveProblem(
        similarities=anchors @ candidates.t(),
        positive_columns=positions,
        negative_mask=negative_mask,
        anchor_keys=dataset_indices,
        anchor_slots=anchor_slots,
        candidate_keys=candidate_keys,
        candidate_views=candidate_views,
        num_batch_columns=num_pairs,
        self_columns=torch.full_like(dataset_indices, -1),
        start_keys=None if start_keys is None else start_keys.to(device=device, dtype=torch.long),
        start_views=None if start_views is None else start_views.to(device=device, dtype=torch.long),
        chain_anchors=None if chain_anchors is None else chain_anchors.to(device=device, dtype=torch.bool),
        num_duplicates_dropped=num_dropped,
        inverse_temperature=inverse_temperature,
    )


def image_text_problems(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    dataset_indices: torch.Tensor,
    *,
    image_view_keys: torch.Tensor | None = None,
    caption_index: torch.Tensor | None = None,
    text_states: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    text_starts: tuple[torch.Tensor, torch.Tensor] | None = None,
    image_states: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    image_starts: tuple[torch.Tensor, torch.Tensor] | None = None,
    inverse_temperature: float | torch.Tensor | None = None,
) -> ImageTextProblems:
    """Both directions of ``b`` image–text pairs (CLIP's layout).

    Args:
        image_embeddings: ``[b, d]``, the images' projected features (any float dtype).
        text_embeddings: ``[b, d]``, their captions' projected features.
        dataset_indices: ``LongTensor[b]``.
        image_view_keys: ``LongTensor[b]``, what re-creates each image (its augmentation key; default 0).
        caption_index: ``LongTensor[b]``, which of its row's captions each text is (default 0): the text's view key,
            and the chain slot of the text anchor (each caption of a pair keeps its own text→image chain, because
            captions of one image have different targets; the image→text chain of a pair is one, slot 0).
        text_states: ``(features [k_t, d], keys [k_t], caption indices [k_t])``: re-encoded captions, the chain
            states of the image anchors.
        text_starts: ``(keys [b], caption indices [b])``: where each image anchor's chain starts.
        image_states: ``(features [k_i, d], keys [k_i], view keys [k_i])``: re-encoded images, the chain states of
            the text anchors.
        image_starts: ``(keys [b], view keys [b])``: where each text anchor's chain starts.
        inverse_temperature: ``β`` of both (e.g. ``exp(logit_scale)``, a learned 0-dim tensor).
    """
    text_state, image_state = text_states or (None, None, None), image_states or (None, None, None)
    text_start, image_start = text_starts or (None, None), image_starts or (None, None)
    image_to_text = cross_modal_problem(
        image_embeddings,
        text_embeddings,
        dataset_indices,
        candidate_views=caption_index,
        state_embeddings=text_state[0],
        state_keys=text_state[1],
        state_views=text_state[2],
        start_keys=text_start[0],
        start_views=text_start[1],
        inverse_temperature=inverse_temperature,
    )
    text_to_image = cross_modal_problem(
        text_embeddings,
        image_embeddings,
        dataset_indices,
        candidate_views=image_view_keys,
        anchor_slots=caption_index,
        state_embeddings=image_state[0],
        state_keys=image_state[1],
        state_views=image_state[2],
        start_keys=image_start[0],
        start_views=image_start[1],
        inverse_temperature=inverse_temperature,
    )
    return ImageTextProblems(image_to_text, text_to_image)
