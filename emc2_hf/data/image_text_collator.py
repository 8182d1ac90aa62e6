"""``ImageTextCollator``: image–caption rows → pixel values, tokenised captions, their keys, and EMC² chain states.

A batch of ``b`` rows is a ``b × b`` image–text problem whose diagonal is the positive: image ``k`` and caption ``k``
come from row ``k``. Each image is one augmented view (:class:`ImageTextTransforms`) and each text one of its row's
captions; both carry the key that re-creates them, so per-sample state (EMC²'s chains, one per direction) can name
any image view or caption and the collator can deliver it again, re-created, in DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch
from PIL import Image
from torchvision.transforms import v2

from ..objectives.problem import NO_STATE, states_to_encode
from ..sampling.random import keyed_seed, keyed_transform
from ..sampling.sample_state import ChainStateTable
from .augmentations import NormalisedImagePipelines
from .collator import MissingColumnError, check_index_column, check_unique_indices
from .image_text import CAPTIONS_COLUMN, IMAGE_COLUMN, as_caption_list, caption_problem
from .images import UndecodableImageError, decode_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHAIN_DIRECTIONS = ("image_to_text", "text_to_image")
"""``"image_to_text"``: image anchors, whose chain states are captions ``(row, caption number)``;
``"text_to_image"``: text anchors, whose chain states are image views ``(row, image view key)``."""

_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "box": v2.InterpolationMode.BOX,
    "hamming": v2.InterpolationMode.HAMMING,
    "lanczos": v2.InterpolationMode.LANCZOS,
}
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_CAPTION_CHOICES = ("random", "first")
_SOURCE = "the training set"


def _invalid(name: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"ImageTextTransforms: {name}={value!r} is invalid; it must be {valid}.")


@dataclass
class ImageTextTransforms(NormalisedImagePipelines):
    """CLIP-style image transforms: a mild random resized crop (± horizontal flip) for training, resize + centre crop
    for evaluation, both normalised. Pipelines are built on first use and cached; assigning a field drops the cache.

    Args:
        image_size: side of the square output, in pixels.
        mean: per-channel normalisation mean (CLIP's by default).
        std: per-channel normalisation standard deviation (CLIP's by default).
        crop_scale: ``(low, high)`` area of the training crop as a fraction of the image, ``0 < low ≤ high ≤ 1``.
        horizontal_flip: flip training views with probability 0.5 (off by default: captions say "left" and "right").
        interpolation: resampling, one of ``nearest``, ``bilinear``, ``bicubic`` (CLIP's), ``box``, ``hamming``,
            ``lanczos``.
        eval_resize: the shorter side before the evaluation centre crop (``None``: ``image_size``).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop_scale: tuple[float, float] = (0.9, 1.0)
    horizontal_flip: bool = False
    interpolation: str = "bicubic"
    eval_resize: int | None = None

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        self.validate()

    @classmethod
    def from_image_processor(cls, processor: Any, **overrides: Any) -> ImageTextTransforms:
        """Size, mean, std and resampling of a transformers image processor (``CLIPImageProcessor`` or alike, or a
        processor holding one as ``.image_processor``): ``image_size`` is its crop size (or its size when it does not
        crop), ``eval_resize`` its ``size["shortest_edge"]``. Any field can be overridden by keyword."""
        processor = getattr(processor, "image_processor", processor)
        size = _side(getattr(processor, "size", None))
        crop = _side(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", True) else None
        image_size = crop or size
        if image_size is None:
            raise ValueError(
                f"ImageTextTransforms.from_image_processor: {type(processor).__name__} states no size or crop_size; "
                "pass image_size=..."
            )
        fields: dict[str, Any] = {"image_size": image_size, "eval_resize": size if crop and size else None}
        if getattr(processor, "image_mean", None) is not None:
            fields["mean"] = tuple(processor.image_mean)
        if getattr(processor, "image_std", None) is not None:
            fields["std"] = tuple(processor.image_std)
        interpolation = _interpolation_name(getattr(processor, "resample", None))
        if interpolation is not None:
            fields["interpolation"] = interpolation
        return cls(**{**fields, **overrides})

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first field outside its valid range."""
        for name in ("image_size", "eval_resize"):
            value = getattr(self, name)
            if value is None and name == "eval_resize":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _invalid(name, value, "a positive integer number of pixels")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise _invalid("crop_scale", self.crop_scale, "(low, high) with 0 < low <= high <= 1")
        if len(self.mean) != 3:
            raise _invalid("mean", self.mean, "3 values, one per RGB channel")
        if len(self.std) != 3 or not all(s > 0.0 for s in self.std):
            raise _invalid("std", self.std, "3 positive values, one per RGB channel")
        if self.interpolation not in _INTERPOLATIONS:
            raise _invalid("interpolation", self.interpolation, f"one of {sorted(_INTERPOLATIONS)}")

    @cached_property
    def train_pipeline(self) -> v2.Compose:
        """The random torchvision pipeline behind :meth:`train_transform` (draws from torch's default generator)."""
        self.validate()
        mode = _INTERPOLATIONS[self.interpolation]
        flip = [v2.RandomHorizontalFlip(0.5)] if self.horizontal_flip else []
        crop = v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, interpolation=mode, antialias=True)
        return v2.Compose([crop, *flip, *self._to_normalised_tensor()])

    @cached_property
    def eval_pipeline(self) -> v2.Compose:
        """The deterministic torchvision pipeline behind :meth:`eval_transform`."""
        self.validate()
        resize = v2.Resize(self.eval_resize or self.image_size, interpolation=_INTERPOLATIONS[self.interpolation])
        return v2.Compose([resize, v2.CenterCrop(self.image_size), *self._to_normalised_tensor()])


def _side(size: Any) -> int | None:
    """The square side an image processor's ``size``/``crop_size`` states: an int, or a dict (or transformers'
    ``SizeDict``) of ``shortest_edge`` or ``height``/``width``."""
    if size is None or isinstance(size, int):
        return size

    def entry(key: str) -> Any:
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    if entry("shortest_edge"):
        return int(entry("shortest_edge"))
    height, width = entry("height"), entry("width")
    if height and width:
        if height != width:
            raise ValueError(f"ImageTextTransforms makes square images; the processor asks for {height}x{width}")
        return int(height)
    return None


def _interpolation_name(resample: Any) -> str | None:
    """``"bicubic"`` etc. for a PIL resampling code (an int or ``PILImageResampling``) or an interpolation enum."""
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return value if value in _INTERPOLATIONS else None
    try:
        return _PIL_RESAMPLE.get(int(value))
    except (TypeError, ValueError):
        return None


def render_view(transforms: ImageTextTransforms, image: Image.Image, key: int) -> torch.Tensor:
    """The training view of ``image`` drawn with the augmentation seed ``key`` (``NO_STATE``: torch's global RNG),
    seeding torch's default CPU generator as :meth:`ContrastiveCollator.render` does: the same key, the same view.

    Returns:
        ``FloatTensor[3, H, W]``.
    """
    return keyed_transform(transforms.train_transform, image, key)


@dataclass
class ImageTextCollator:
    """Data collator for image–text contrastive training (CLIP, SogCLR, EMC² on image–caption pairs).

    ``__call__(rows)`` decodes each row's image, makes one view of it, picks one of its captions and tokenises the
    captions::

        {"pixel_values":    FloatTensor[b, 3, H, W],
         "input_ids":       LongTensor[b, L],  "attention_mask": LongTensor[b, L]  (+ "token_type_ids" if returned),
         index_column:      LongTensor[b],     # each row's dataset index
         "image_view_keys": LongTensor[b],     # what re-creates each image view
         "caption_index":   LongTensor[b]}     # which caption of its row each text is (the text's view key)

    Row ``k``'s image and text are the positive pair ``(k, k)``.

    **Image views.** With ``augment`` and ``seed`` set, the view of the row with dataset index ``i`` in epoch ``e``
    is ``transforms.train_transform`` drawn from the key ``keyed_seed(seed, "image-augmentation", e, i)`` (its
    ``image_view_keys`` entry): independent of workers, batch composition and order, and re-creatable from the key.
    ``seed=None``: torch's global RNG, key ``NO_STATE`` (not re-creatable). ``augment=False``: the deterministic
    ``transforms.eval_transform``, key ``0`` (every epoch the same view).

    **Captions.** ``caption_choice="random"``: caption ``keyed_seed(seed, "caption", e, i) mod n`` of the row's ``n``
    captions — uniform, reproducible, independent of workers and batches, and different each epoch (``seed=None``:
    torch's global RNG). ``"first"``: always caption 0. A caption is re-created from ``(row, caption_index)`` alone.

    **Chain states** (:meth:`attach_chain_states`): EMC²'s chains, one per example and direction, read from shared
    tables; the batch then also carries each anchor's chain state and, re-created, the states it does not hold::

        "text_start_index", "text_start_view":    LongTensor[b]        # each image's chain state: (row, caption)
        "state_input_ids", "state_attention_mask" (, "state_token_type_ids"): LongTensor[k_t, L]
        "state_text_index", "state_text_view":    LongTensor[k_t]      # caption `view` of row `index`
        "image_start_index", "image_start_view":  LongTensor[b]        # each text's chain state: (row, view key)
        "state_pixel_values":                     FloatTensor[k_i, 3, H, W]
        "state_image_index", "state_image_view":  LongTensor[k_i]

    The states delivered are :func:`~emc2_hf.objectives.problem.states_to_encode` of the starts: non-empty, not in
    the batch, each once. Batch and state captions are tokenised in one call, so ``input_ids`` and
    ``state_input_ids`` share ``L``. Either direction's table may be absent.

    Args:
        tokenizer: a transformers tokenizer (called with ``padding="longest"``, ``truncation=True``).
        transforms: the image transforms.
        image_column: the column holding the images (anything :func:`decode_image` accepts).
        caption_column: the column holding each row's captions (a list of strings, or one string).
        index_column: the column holding each row's dataset index (the ContrastiveTrainer adds it).
        caption_choice: ``"random"`` or ``"first"`` (see above).
        seed: keys image views and caption choices (the ContrastiveTrainer sets it to ``args.seed`` when unset).
        epoch: the current epoch (the trainer updates it at every epoch start).
        max_length: the longest tokenised caption (CLIP: 77 tokens).
        augment: random training views (``False``: evaluation views, e.g. for a frozen image tower).
    """

    tokenizer: Any
    modality: ClassVar[str] = "image_text"
    """What the ContrastiveTrainer reads to train a dual encoder on this collator's batches."""

    transforms: ImageTextTransforms = field(default_factory=ImageTextTransforms)
    image_column: str = IMAGE_COLUMN
    caption_column: str = CAPTIONS_COLUMN
    index_column: str = "dataset_index"
    caption_choice: str = "random"
    seed: int | None = None
    epoch: int = 0
    max_length: int = 77
    augment: bool = True
    chain_states: dict[str, ChainStateTable] = field(default_factory=dict, repr=False)
    state_source: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.caption_choice not in _CAPTION_CHOICES:
            raise ValueError(
                f"ImageTextCollator: caption_choice={self.caption_choice!r} is invalid; use one of {_CAPTION_CHOICES}"
            )

    @property
    def required_columns(self) -> list[str]:
        """Columns every row must have: ``[image_column, caption_column, index_column]``."""
        return [self.image_column, self.caption_column, self.index_column]

    @property
    def num_state_slots(self) -> int:
        """Image→text chains per example: one (a pair has one image anchor; text→image chains are one per caption)."""
        return 1

    def attach_chain_states(self, tables: dict[str, ChainStateTable], dataset: Any) -> None:
        """Deliver chain states: read starts from ``tables`` (keys :data:`CHAIN_DIRECTIONS`, one slot per example)
        and re-create state captions and images from ``dataset`` (the training set, indexed by dataset index).
        ``"text_to_image"`` states are image views, so it needs ``seed`` unless ``augment=False``."""
        unknown = sorted(set(tables) - set(CHAIN_DIRECTIONS))
        if unknown:
            raise ValueError(
                f"ImageTextCollator: unknown chain direction(s) {unknown}; the tables are keyed by {CHAIN_DIRECTIONS}"
            )
        image_slots = tables["image_to_text"].state_index.shape[1] if "image_to_text" in tables else 1
        if image_slots != 1:
            raise ValueError(
                f"ImageTextCollator: the 'image_to_text' chain table has {image_slots} "
                "slots per example, but a pair's image has one chain; build it with num_slots=1 "
                "(emc2_hf.objectives.build_image_text_objective does)"
            )
        if "text_to_image" in tables and self.augment and self.seed is None:
            raise ValueError(
                "ImageTextCollator: text_to_image chain states are image views, which need re-creatable views; set "
                "seed (the ContrastiveTrainer sets it to args.seed), or augment=False"
            )
        self.chain_states, self.state_source = dict(tables), dataset
        self.__dict__.pop("_column_views", None)

    def image_view_key(self, index: int) -> int:
        """The view key of the image with dataset index ``index`` this epoch (see the class doc)."""
        if not self.augment:
            return 0
        if self.seed is None:
            return NO_STATE
        return keyed_seed(self.seed, "image-augmentation", self.epoch, index)

    def choose_caption(self, index: int, num_captions: int) -> int:
        """Which of the ``num_captions`` captions of the row with dataset index ``index`` is its text this epoch."""
        if self.caption_choice == "first" or num_captions == 1:
            return 0
        if self.seed is None:
            return int(torch.randint(num_captions, ()))
        return keyed_seed(self.seed, "caption", self.epoch, index) % num_captions

    def render(self, image: Image.Image, key: int) -> torch.Tensor:
        """The image view with view key ``key``: ``FloatTensor[3, H, W]`` (the evaluation view when not augmenting)."""
        if not self.augment:
            return self.transforms.eval_transform(image)
        return render_view(self.transforms, image, key)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``texts`` tokenised as the batch is: ``{"input_ids": LongTensor[n, L], "attention_mask": ..., ...}``."""
        encoded = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return dict(encoded)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``b ≥ 2`` rows into the batch described in the class doc."""
        self._check_batch_size(len(rows))
        for row in rows:
            self._check_columns(row)
        indices = [int(row[self.index_column]) for row in rows]
        self._check_unique(indices)
        captions = [
            self._captions(row[self.caption_column], index, row) for row, index in zip(rows, indices, strict=True)
        ]
        caption_index = [self.choose_caption(index, len(c)) for index, c in zip(indices, captions, strict=True)]
        texts = [c[k] for c, k in zip(captions, caption_index, strict=True)]
        keys = [self.image_view_key(index) for index in indices]
        pixel_values = [
            self.render(self._decode(row[self.image_column], index), key)
            for row, index, key in zip(rows, indices, keys, strict=True)
        ]
        batch = {
            "pixel_values": torch.stack(pixel_values),
            self.index_column: torch.tensor(indices, dtype=torch.long),
            "image_view_keys": torch.tensor(keys, dtype=torch.long),
            "caption_index": torch.tensor(caption_index, dtype=torch.long),
        }
        state_texts: list[str] = []
        if "image_to_text" in self.chain_states:
            text_states = self._text_states(batch)
            state_texts = text_states.pop("texts")
            batch.update(text_states)
        if "text_to_image" in self.chain_states:
            batch.update(self._image_states(batch))
        encoded = self.tokenize(texts + state_texts)
        size = len(rows)
        for name, values in encoded.items():
            batch[name] = values[:size]
            if "image_to_text" in self.chain_states:
                batch[f"state_{name}"] = values[size:]
        return batch

    def _text_states(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Each image's chain state (a caption) and the captions of the states the batch does not hold."""
        indices = batch[self.index_column]
        start_index, start_view = self.chain_states["image_to_text"].read(indices, torch.zeros_like(indices))
        state_index, state_view = states_to_encode(start_index, start_view, indices, batch["caption_index"])
        texts = []
        for index, view in zip(state_index.tolist(), state_view.tolist(), strict=True):
            captions = self._captions(self._state_row(index, self.caption_column), index)
            if not 0 <= view < len(captions):
                raise ValueError(
                    f"ImageTextCollator: a chain state is caption {view} of row {index}, which has {len(captions)} "
                    "caption(s); the chain table does not match this training set (refresh it after changing the data)"
                )
            texts.append(captions[view])
        return {
            "text_start_index": start_index,
            "text_start_view": start_view,
            "state_text_index": state_index,
            "state_text_view": state_view,
            "texts": texts,
        }

    def _image_states(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each text's chain state (an image view) and the re-created views of the states the batch does not hold."""
        indices = batch[self.index_column]
        # Each caption of a pair keeps its own chain (slot = caption index): captions of one image have different
        # targets. A caption index beyond the table's slots is refused by the objective with the fix.
        table = self.chain_states["text_to_image"]
        slots = batch["caption_index"]
        if int(slots.max()) >= table.state_index.shape[1]:
            raise ValueError(
                f"ImageTextCollator: caption {int(slots.max())} of a row has no text→image chain (the table keeps "
                f"{table.state_index.shape[1]} per pair); build the objective with captions_per_pair = the most "
                "captions a row has (the ContrastiveTrainer counts them)"
            )
        start_index, start_view = table.read(indices, slots)
        state_index, state_view = states_to_encode(start_index, start_view, indices, batch["image_view_keys"])
        height, width = batch["pixel_values"].shape[-2:]
        state_pixel_values = batch["pixel_values"].new_empty(0, 3, height, width)
        if state_index.numel():
            views = [
                self.render(self._decode(self._state_row(index, self.image_column), index), key)
                for index, key in zip(state_index.tolist(), state_view.tolist(), strict=True)
            ]
            state_pixel_values = torch.stack(views)
        return {
            "image_start_index": start_index,
            "image_start_view": start_view,
            "state_pixel_values": state_pixel_values,
            "state_image_index": state_index,
            "state_image_view": state_view,
        }

    def _state_row(self, index: int, column: str) -> Any:
        """``column`` of training row ``index``, reading only that column of a ``datasets.Dataset``."""
        source = self.state_source
        if hasattr(source, "select_columns"):
            views = self.__dict__.setdefault("_column_views", {})
            if column not in views:
                views[column] = source.select_columns([column])
            source = views[column]
        return source[index][column]

    def eval_pixel_values(self, images: list[Any]) -> torch.Tensor:
        """Deterministic pixel values for evaluation (``transforms.eval_transform``): ``FloatTensor[n, 3, H, W]``."""
        return torch.stack([self.transforms.eval_transform(image) for image in images])

    def _decode(self, value: Any, index: int) -> Image.Image:
        try:
            return decode_image(value, row=index, source=_SOURCE)
        except UndecodableImageError as error:
            raise UndecodableImageError(
                f"ImageTextCollator: {error} For image-text data, drop_bad_image_text_rows(dataset, "
                "check_images=True) drops such rows."
            ) from error

    def _captions(self, value: Any, index: int, row: dict[str, Any] | None = None) -> list[str]:
        captions = as_caption_list(value)
        problem = caption_problem(captions)
        if problem is not None:
            image = f" (file {path})" if row is not None and (path := _image_path(row.get(self.image_column))) else ""
            raise ValueError(
                f"ImageTextCollator: row {index} of {_SOURCE}{image} {problem} in column {self.caption_column!r}. "
                "Fill it in or drop such rows with drop_bad_image_text_rows(dataset) (emc2_hf.data)."
            )
        return captions

    def _check_batch_size(self, size: int) -> None:
        if size < 2:
            pairs = "1 image-text pair leaves it" if size == 1 else "0 pairs leaves"
            raise ValueError(
                f"ImageTextCollator: a batch of {pairs} without negatives; contrastive training needs at least 2 "
                "pairs per batch: raise per_device_train_batch_size, or keep dataloader_drop_last=True so a short "
                "last batch is dropped."
            )

    def _check_columns(self, row: dict[str, Any]) -> None:
        for column, flag in ((self.image_column, "image_column"), (self.caption_column, "caption_column")):
            if column not in row:
                raise MissingColumnError(
                    f"ImageTextCollator: no column {column!r} in the dataset rows; the columns are {sorted(row)}. "
                    f"Pass {flag}='<one of them>', or load the data with emc2_hf.data.load_image_text_split, which "
                    "names them 'image' and 'captions'."
                )
        check_index_column(row, self.index_column, "ImageTextCollator")

    def _check_unique(self, indices: list[int]) -> None:
        check_unique_indices(indices, self.index_column, "ImageTextCollator", "a pair")


def _image_path(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("path") or None
    return value if isinstance(value, str) else None
