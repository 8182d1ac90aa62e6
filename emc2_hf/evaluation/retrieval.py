"""Image↔text retrieval recall of a dual encoder (CLIP-style), and the pieces the zero-shot evaluator shares.

Recall@k is measured as in CLIP (Radford et al., 2021, Table 13) on Flickr30k / COCO: every caption of an image is a
query (text→image) and every image is a query whose positives are all its captions (image→text). Similarities are
cosines: embeddings are L2-normalised here, so their scale never matters.

**Ties** are broken deterministically by candidate index: the candidates of a query are ranked by decreasing cosine,
equal cosines by increasing index (row of the image, position of the caption), so the ranking is a total order and
"the top k" always holds exactly ``min(k, number of candidates)`` candidates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import decode_image
from ..modeling.dual_encoder import encode_images, encode_texts
from .probes import _check_column, _column, _undecoded

Evaluator = Callable[..., dict[str, float]]
"""The trainer's evaluator protocol: ``evaluator(model, device=None) -> {metric: value}``."""


def normalised(embeddings: torch.Tensor) -> torch.Tensor:
    """``embeddings`` (``[..., d]``, any float dtype) L2-normalised along the last dimension, in at least float32.

    Half-precision inputs are promoted so that ranking does not suffer from bf16 rounding; a zero row stays zero.
    """
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be a floating-point tensor, got {embeddings.dtype}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values; check the model (did training diverge?)")
    return F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=-1)


def normalised_pair(
    first: torch.Tensor, second: torch.Tensor, first_name: str, second_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``first`` ``[m, d]`` and ``second`` ``[c, d]`` L2-normalised (:func:`normalised`), in one dtype on ``first``'s
    device; a one-line ``ValueError`` naming both (e.g. ``"image_embeddings [n, d]"``) unless ``m, c, d > 0``."""
    if first.ndim != 2 or second.ndim != 2 or first.shape[1] != second.shape[1] or 0 in (*first.shape, len(second)):
        raise ValueError(
            f"{first_name} and {second_name} must be non-empty matrices of the same width d > 0, got "
            f"{tuple(first.shape)} and {tuple(second.shape)}"
        )
    first, second = normalised(first), normalised(second)
    dtype = torch.promote_types(first.dtype, second.dtype)
    return first.to(dtype), second.to(device=first.device, dtype=dtype)


def rank_of_first_positive(similarity: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """``LongTensor[q]``: the 0-based rank of each query's best-ranked positive among its candidates.

    Args:
        similarity: ``[q, c]``, the score of every candidate for every query.
        positive: ``bool[q, c]``, which candidates are right answers; every row needs at least one.

    Candidates are ranked by decreasing score, equal scores by increasing column index (the module's tie rule), so
    the rank is the number of candidates strictly ahead: higher-scored ones plus equal-scored ones with a smaller
    index. "A positive is in the top k" is then exactly ``rank < k``.
    """
    best = similarity.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # [q, 1]
    tied = similarity == best  # [q, c]
    best_index = (positive & tied).to(torch.uint8).argmax(dim=1, keepdim=True)  # [q, 1]: argmax takes the first
    index = torch.arange(similarity.shape[1], device=similarity.device)[None, :]  # [1, c]
    return ((similarity > best) | (tied & (index < best_index))).sum(dim=1)


def _check_ks(ks: Sequence[int], name: str) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"{name} must be a non-empty sequence of integers >= 1, got {ks}")
    return ks


def retrieval_recall(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_image: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    text_groups: torch.Tensor | Sequence[int] | None = None,
) -> dict[str, float]:
    """Image→text and text→image recall@k of cosine similarity, every caption of an image counting.

    Args:
        image_embeddings: ``[n, d]``, one row per image (any float dtype; L2-normalised here).
        text_embeddings: ``[t, d]``, one row per caption.
        text_image: ``int[t]``, the row of ``image_embeddings`` each caption describes. Every image needs at least one
            caption (images without one have no right answer for image→text; drop them first).
        ks: the cut-offs; a ``k`` at or above the number of candidates gives recall 1.
        chunk_size: queries scored at once: memory is a few ``[chunk_size, max(n, t)]`` tensors, never ``n × t``
            (5k images × 25k captions, d = 256, in chunks of 1024: ~0.75 GB at peak, ~10 s on two CPU cores). The
            result does not depend on it.
        text_groups: ``int[t]`` or ``None``: captions with one group id are the same text (e.g. identical strings).
            Then a caption is a right answer for every image that has a caption of its group, in both directions —
            needed where many images share captions (template captions, as digits'), where the standard protocol
            would count a tie among identical captions as a miss. Memory: an ``[n, groups]`` boolean table.

    Returns:
        ``image_to_text_recall@k``: the fraction of images with **any** of their captions among their top-k texts;
        ``text_to_image_recall@k``: the fraction of captions whose image is among their top-k images; for every
        ``k`` in ``ks``, each in ``[0, 1]``. Ties are broken by index (see the module docstring).
    """
    ks = _check_ks(ks, "ks")
    images, texts = normalised_pair(
        image_embeddings, text_embeddings, "image_embeddings [n, d]", "text_embeddings [t, d]"
    )
    text_image = torch.as_tensor(text_image, device=images.device).long()
    n, t = images.shape[0], texts.shape[0]
    if text_image.shape != (t,) or text_image.min() < 0 or text_image.max() >= n:
        raise ValueError(f"text_image must hold one image row in [0, {n}) per caption ({t}), got {text_image.shape}")
    uncaptioned = torch.ones(n, dtype=torch.bool, device=images.device).index_fill_(0, text_image, False)
    if uncaptioned.any():
        rows = uncaptioned.nonzero().flatten()[:10].tolist()
        raise ValueError(f"images {rows} have no caption in text_image; every image needs at least one")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    image_rows, text_rows = torch.arange(n, device=images.device), torch.arange(t, device=images.device)
    has_group = None
    if text_groups is not None:
        groups = torch.as_tensor(text_groups, device=images.device).long()
        if groups.shape != (t,) or groups.min() < 0:
            raise ValueError(f"text_groups must hold one group id >= 0 per caption ({t}), got {groups.shape}")
        has_group = torch.zeros(n, int(groups.max()) + 1, dtype=torch.bool, device=images.device)
        has_group[text_image, groups] = True  # [n, G]: which texts each image has
    image_ranks, text_ranks = [], []
    for start in range(0, n, chunk_size):
        queries = image_rows[start : start + chunk_size]  # [q]
        if has_group is None:
            positive = text_image[None, :] == queries[:, None]  # [q, t]: the captions of each image
        else:
            positive = has_group[queries][:, groups]  # [q, t]: every caption with one of the image's texts
        image_ranks.append(rank_of_first_positive(images[queries] @ texts.T, positive))
    for start in range(0, t, chunk_size):
        queries = text_rows[start : start + chunk_size]  # [q]
        if has_group is None:
            positive = image_rows[None, :] == text_image[queries, None]  # [q, n]: each caption's image
        else:
            positive = has_group[:, groups[queries]].T  # [q, n]: every image that has this caption's text
        text_ranks.append(rank_of_first_positive(texts[queries] @ images.T, positive))
    image_rank, text_rank = torch.cat(image_ranks), torch.cat(text_ranks)
    metrics = {f"image_to_text_recall@{k}": float((image_rank < k).double().mean()) for k in ks}
    metrics.update({f"text_to_image_recall@{k}": float((text_rank < k).double().mean()) for k in ks})
    return metrics


# --- encoding a dataset with a dual encoder (shared with zero_shot.py) ---------------------------------------------


def model_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """``device``, else the device of ``model``'s first parameter, else CPU."""
    if device is not None:
        return torch.device(device)
    return next((parameter.device for parameter in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Run the block in eval mode under ``torch.no_grad()``, then give ``model`` back its train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encode_image_column(
    model: torch.nn.Module,
    dataset: Any,
    image_transform: Callable[[Image.Image], torch.Tensor],
    image_column: str,
    batch_size: int,
    device: torch.device,
    source: str,
) -> torch.Tensor:
    """``FloatTensor[n, p]`` on CPU: :func:`~emc2_hf.modeling.encode_images` of every row's image, in row order.

    Each value is decoded with :func:`~emc2_hf.data.images.decode_image` (errors name the row, ``source`` and the
    file) and turned into ``[3, H, W]`` by ``image_transform``. Call inside :func:`evaluating`.
    """
    dataset = _undecoded(dataset, image_column)
    chunks = []
    for start in range(0, len(dataset), batch_size):
        values = _column(dataset, start, min(start + batch_size, len(dataset)), image_column)
        pixel_values = torch.stack(
            [image_transform(decode_image(value, row=row, source=source)) for row, value in enumerate(values, start)]
        )
        chunks.append(encode_images(model, pixel_values.to(device)).float().cpu())
    return torch.cat(chunks)


def encode_text_list(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    device: torch.device,
) -> torch.Tensor:
    """``FloatTensor[len(texts), p]`` on CPU: :func:`~emc2_hf.modeling.encode_texts` of ``texts``, in order.

    Each batch is tokenised as ``tokenizer(batch, padding=True, truncation=True, max_length=max_length,
    return_tensors="pt")`` and every tensor the tokenizer returns is passed on. Call inside :func:`evaluating`.
    """
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        chunks.append(encode_texts(model, **{key: value.to(device) for key, value in batch.items()}).float().cpu())
    return torch.cat(chunks)


def check_columns(dataset: Any, columns: dict[str, str], where: str) -> None:
    """Raise a one-line ``ValueError`` naming a missing column, the columns present and the argument to set.

    ``columns`` maps each argument (``"image_column"``) to the column it names (``"image"``).
    """
    for argument, column in columns.items():
        try:
            _check_column(dataset, column, where)
        except ValueError as error:
            raise ValueError(f"{error}; set {argument} to the right column") from None
    if len(dataset) == 0:
        raise ValueError(f"{where}: the dataset has no rows")


def flatten_captions(values: Sequence[Any], caption_column: str) -> tuple[list[str], list[int]]:
    """``(captions, text_image)``: every caption of every row, and the row each came from.

    A row's value is one string or a list of strings; each must be non-empty (not only whitespace).
    """
    captions, text_image = [], []
    for row, value in enumerate(values):
        row_captions = [value] if isinstance(value, str) else value
        if not isinstance(row_captions, Sequence) or not row_captions:
            raise ValueError(
                f"RetrievalEvaluator: row {row} of column {caption_column!r} has no caption ({value!r}); every image "
                "needs a string or a non-empty list of strings (filter such rows out)"
            )
        for position, caption in enumerate(row_captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(
                    f"RetrievalEvaluator: caption {position} of row {row} of column {caption_column!r} is "
                    f"{caption!r}, not a non-empty string; fix or filter that row"
                )
            captions.append(caption)
            text_image.append(row)
    return captions, text_image


@dataclass
class RetrievalEvaluator:
    """Image↔text recall@1/5/10 of a dual encoder on an image–caption dataset (Flickr30k, COCO Karpathy test).

    ``__call__(model, device=None)`` encodes every image with :func:`~emc2_hf.modeling.encode_images` and every caption
    with :func:`~emc2_hf.modeling.encode_texts`, in eval mode without gradients (the model's train/eval mode is
    restored), and returns :func:`retrieval_recall`: ``image_to_text_recall@{1,5,10}`` and
    ``text_to_image_recall@{1,5,10}``. The model is a ``VisionTextDualEncoderModel``, a ``CLIPModel`` or anything with
    ``get_image_features`` / ``get_text_features``.

    Args:
        dataset: a ``datasets.Dataset`` or a sequence of dict rows, one row per image.
        tokenizer: the text tower's tokenizer (called with ``padding``, ``truncation``, ``max_length``).
        image_transform: ``PIL.Image`` (RGB) → ``FloatTensor[3, H, W]``, the eval preprocessing of the image tower.
        image_column: the column holding the images (anything :func:`~emc2_hf.data.images.decode_image` reads).
        caption_column: the column holding one caption (``str``) or several (``list[str]``: Flickr30k and COCO have 5)
            per image; **all** of them are queries and all count as positives of their image. Checked at construction.
        batch_size: images or captions encoded per forward pass.
        max_length: captions are truncated to this many tokens (77 for CLIP).
        ks: the recall cut-offs.
        name: what ``dataset`` is, for error messages.
    """

    dataset: Any
    tokenizer: Any
    image_transform: Callable[[Image.Image], torch.Tensor]
    image_column: str = "image"
    caption_column: str = "captions"
    batch_size: int = 64
    max_length: int = 77
    ks: Sequence[int] = (1, 5, 10)
    name: str = "the retrieval set"
    identical_captions_match: bool = False
    """Count identical caption strings as one text (:func:`retrieval_recall`'s ``text_groups``): a caption is then
    right for every image that carries the same string. Off: the standard Flickr30k / COCO protocol."""
    captions: list[str] = field(init=False, repr=False)
    text_image: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_columns(
            self.dataset,
            {"image_column": self.image_column, "caption_column": self.caption_column},
            "RetrievalEvaluator: dataset",
        )
        self.ks = _check_ks(self.ks, "ks")
        self.captions, self.text_image = flatten_captions(
            _column(self.dataset, 0, len(self.dataset), self.caption_column), self.caption_column
        )

    def __call__(self, model: torch.nn.Module, device: torch.device | str | None = None) -> dict[str, float]:
        """``{"image_to_text_recall@k", "text_to_image_recall@k"}`` for every ``k`` in ``ks``, in ``[0, 1]``."""
        device = model_device(model, device)
        with evaluating(model):
            images = encode_image_column(
                model, self.dataset, self.image_transform, self.image_column, self.batch_size, device, self.name
            )
            texts = encode_text_list(model, self.tokenizer, self.captions, self.batch_size, self.max_length, device)
        groups = None
        if self.identical_captions_match:
            ids: dict[str, int] = {}
            groups = [ids.setdefault(caption, len(ids)) for caption in self.captions]
        return retrieval_recall(images, texts, self.text_image, self.ks, text_groups=groups)


def combine_evaluators(*evaluators: Evaluator) -> Evaluator:
    """One evaluator that runs ``evaluators`` in order and returns their merged metrics.

    E.g. ``combine_evaluators(ZeroShotEvaluator(...), RetrievalEvaluator(...))`` gives the trainer a single callable
    ``evaluator(model, device=None) -> dict[str, float]``. Two evaluators returning the same key is an error (one
    would silently hide the other).
    """
    if not evaluators:
        raise ValueError("combine_evaluators needs at least one evaluator")

    def evaluate(model: torch.nn.Module, device: torch.device | str | None = None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for evaluator in evaluators:
            values = evaluator(model, device=device)
            clash = sorted(set(metrics) & set(values))
            if clash:
                raise ValueError(f"two evaluators both return {clash}; give one of them other metric names")
            metrics.update(values)
        return metrics

    return evaluate
