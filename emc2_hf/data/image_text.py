"""Image–caption data for CLIP-style dual-encoder training: Flickr30k and COCO (Karpathy splits), captioned folders and
files, and scikit-learn's digits with template captions (the offline default).

Every loader returns a ``datasets.Dataset`` normalised to

* ``image``: the image, undecoded (``datasets.Image(decode=False)``: ``{"bytes", "path"}``) so that the collator
  decodes it and can name the row and file of an image that fails;
* ``captions``: the row's captions, a list of non-empty strings;

and keeps the source's other columns (``label``, ``sentids``, ``img_id``, ...). Rows without a usable caption, or
whose image file is missing, raise :class:`ImageTextDataError` naming the row, its file and the fix; pass
``drop_bad_rows=True`` (or call :func:`drop_bad_image_text_rows`) to drop them instead. Images are decoded only by
the collator (an undecodable one raises :class:`~emc2_hf.data.images.UndecodableImageError` naming row and file);
``drop_bad_image_text_rows(dataset, check_images=True)`` decodes every image once to drop those beforehand.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from .digits import load_digits_dataset
from .images import describe_image, find_undecodable_images
from .sources import (
    LOCAL_FILE_BUILDERS,
    DatasetUnavailableError,
    _is_saved_to_disk,
    _missing_path_message,
    _offline_hint,
    load_image_split,
    looks_like_local_path,
    require_column,
)

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
CAPTIONS_COLUMN = "captions"
FLICKR30K = "nlphuji/flickr30k"
COCO_KARPATHY = "yerevann/coco-karpathy"
DIGITS = "digits"

DIGIT_CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Class ``k`` of :func:`load_digits_captions` is the digit ``k``, named ``DIGIT_CLASS_NAMES[k]``."""
DIGIT_CAPTION_TEMPLATES = (
    "a photo of the digit {name}",
    "a handwritten {digit}",
    "the number {name}",
    "a handwritten digit {name}",
    "a black and white picture of the number {digit}",
)
"""The captions of every digit image, filled with its class name (``{name}``) and numeral (``{digit}``)."""

KARPATHY_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "png", "webp", "pixel_values")
CAPTION_COLUMN_CANDIDATES = ("captions", "caption", "sentences", "text", "raw", "txt")
_NUMBERED_CAPTION = re.compile(r"^caption_?(\d+)$")
_CAPTIONS_FEATURE = datasets.List(datasets.Value("string"))
_FLICKR30K_CSV = "flickr_annotations_30k.csv"
_FLICKR30K_IMAGES = "flickr30k-images"
_FLICKR30K_COLUMNS = {"caption", "split", "img_id", "filename"}
_COCO_KARPATHY_COLUMNS = {"filepath", "filename", "sentences", "split"}
_DROP_HINT = "drop_bad_image_text_rows(dataset) (or drop_bad_rows=True when loading) drops such rows"


class ImageTextDataError(ValueError):
    """A row without a usable caption, or whose image file is missing; the message names the row, file and fix."""


# ------------------------------------------------------------------------------------------------- captions & rows


def as_caption_list(value: Any) -> list[Any] | None:
    """A caption value as a list: a string → ``[string]``; a list of strings or of ``{"raw": ...}`` sentence dicts
    (Karpathy's JSON) → the strings; ``None`` stays ``None`` (a missing caption). Items are not validated here; see
    :func:`caption_problem`."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list | tuple | np.ndarray):
        return [_sentence_text(item) for item in value]
    return [value]


def _sentence_text(item: Any) -> Any:
    if isinstance(item, dict):
        return next((item[key] for key in ("raw", "caption", "text", "sentence") if key in item), None)
    return item


def caption_problem(captions: Any) -> str | None:
    """What is wrong with a row's captions (after :func:`as_caption_list`), or ``None`` if they are a non-empty list
    of non-empty strings."""
    if captions is None:
        return "has no caption (missing: None)"
    if isinstance(captions, str):
        captions = [captions]
    if len(captions) == 0:
        return "has no caption (an empty list)"
    for number, caption in enumerate(captions):
        if caption is None:
            return f"has a missing caption (caption {number} is None)"
        if not isinstance(caption, str):
            return f"has a caption that is not text (caption {number} is a {type(caption).__name__})"
        if not caption.strip():
            return f"has an empty caption (caption {number} is {caption!r})"
    return None


def _missing_file(value: Any) -> str | None:
    """The path of an image given only by a path that does not exist (images with bytes are never missing)."""
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        path = value["path"]
    elif isinstance(value, str):
        path = value
    else:
        return None
    return None if "://" in path or os.path.isfile(path) else path


def _image_paths(dataset: datasets.Dataset, image_column: str) -> list[Any]:
    """Per row, the image as far as a missing file shows: ``{"bytes": None, "path": p}`` for a path-only ``Image``
    value, the string of a path column, else ``None`` — read from Arrow, so embedded image bytes are never copied."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")[image_column]
    if pa.types.is_struct(column.type) and {"bytes", "path"} <= {field.name for field in column.type}:
        has_bytes = pc.is_valid(pc.struct_field(column, "bytes")).to_pylist()
        paths = pc.struct_field(column, "path").to_pylist()
        return [None if embedded else {"bytes": None, "path": p} for embedded, p in zip(has_bytes, paths, strict=True)]
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.to_pylist()
    return [None] * len(dataset)


def find_bad_image_text_rows(
    dataset: Any,
    caption_column: str = CAPTIONS_COLUMN,
    image_column: str = IMAGE_COLUMN,
    check_images: bool = False,
    source: str | None = None,
) -> list[tuple[int, str]]:
    """``(row, description)`` of every row with a missing or empty caption, or an image file that does not exist
    (and, with ``check_images``, an image that does not decode), in row order.

    ``dataset`` is a ``datasets.Dataset`` or a sequence of dict rows; a description reads e.g. ``"row 7 of split
    'train' (file /data/7.jpg) has an empty caption (caption 2 is '')"``. Without ``check_images`` only the caption
    column and image paths are read (no image bytes).
    """
    if isinstance(dataset, datasets.Dataset):
        require_column(dataset, caption_column, source or "the dataset", "caption_column=<the caption column>")
        require_column(dataset, image_column, source or "the dataset", "image_column=<the image column>")
        captions = list(dataset[caption_column])
        images = _image_paths(dataset, image_column)

        def image_of(row: int) -> Any:  # only for the rows reported
            return _undecoded(dataset.select_columns([image_column]), image_column)[row][image_column]
    else:
        captions = [row[caption_column] for row in dataset]
        images = [row[image_column] for row in dataset]

        def image_of(row: int) -> Any:
            return images[row]

    problems: dict[int, str] = {}
    for row, (value, image) in enumerate(zip(captions, images, strict=True)):
        problem = caption_problem(as_caption_list(value))
        if _missing_file(image) is not None:
            problem = "has no image: the file does not exist" + (f" (and {problem})" if problem else "")
        if problem is not None:
            problems[row] = f"{describe_image(image_of(row), row, source)} {problem}"
    if check_images:
        for row, description in find_undecodable_images(dataset, image_column, source=source):
            problems.setdefault(row, f"{description} has an image that does not decode")
    return sorted(problems.items())


def drop_bad_image_text_rows(
    dataset: Any,
    caption_column: str = CAPTIONS_COLUMN,
    image_column: str = IMAGE_COLUMN,
    check_images: bool = False,
    source: str | None = None,
) -> tuple[Any, int]:
    """Drop the rows :func:`find_bad_image_text_rows` reports; returns ``(dataset, num_dropped)`` and logs the count.

    A row with any missing or empty caption is dropped whole (its other captions with it). ``check_images=True`` also
    decodes every image once, to drop those that fail (slow on large sets: it reads every file).
    """
    bad = find_bad_image_text_rows(dataset, caption_column, image_column, check_images, source)
    if not bad:
        return dataset, 0
    dropped = {row for row, _ in bad}
    keep = [row for row in range(len(dataset)) if row not in dropped]
    logger.warning(
        "dropped %d of %d image-text rows of %s without a usable caption or image; the first: %s",
        len(bad),
        len(dataset),
        source or "the dataset",
        bad[0][1],
    )
    if isinstance(dataset, datasets.Dataset):
        return dataset.select(keep), len(bad)
    return [dataset[row] for row in keep], len(bad)


def _check_rows(dataset: datasets.Dataset, where: str, drop_bad_rows: bool, fix: str = "") -> datasets.Dataset:
    """Raise on (or, with ``drop_bad_rows``, drop) rows without a usable caption or image file."""
    if drop_bad_rows:
        return drop_bad_image_text_rows(dataset, source=where)[0]
    bad = find_bad_image_text_rows(dataset, source=where)
    if bad:
        count = f" ({len(bad)} such rows)" if len(bad) > 1 else ""
        raise ImageTextDataError(f"{bad[0][1]}{count}. {fix}Fill in or remove those rows: {_DROP_HINT}.")
    return dataset


# ---------------------------------------------------------------------------------------------------- normalising


def _undecoded(dataset: datasets.Dataset, image_column: str) -> datasets.Dataset:
    feature = dataset.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _guess_image_column(dataset: datasets.Dataset) -> str | None:
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    return next((name for name in IMAGE_COLUMN_CANDIDATES if name in dataset.column_names), None)


def _guess_caption_columns(dataset: datasets.Dataset) -> list[str]:
    for name in CAPTION_COLUMN_CANDIDATES:
        if name in dataset.column_names:
            return [name]
    numbered = [(int(m.group(1)), name) for name in dataset.column_names if (m := _NUMBERED_CAPTION.match(name))]
    return [name for _, name in sorted(numbered)]


def normalise_image_text(
    dataset: datasets.Dataset,
    image_column: str | None = None,
    caption_column: str | Sequence[str] | None = None,
    where: str = "the dataset",
) -> datasets.Dataset:
    """``dataset`` with columns ``image`` (undecoded) and ``captions`` (a list per row, see :func:`as_caption_list`)
    replacing ``image_column`` and ``caption_column``; the other columns are kept.

    ``caption_column`` may name several columns (e.g. ``["caption_0", ..., "caption_4"]``), whose values become one
    row's captions. ``None`` guesses: the ``Image`` feature or one of :data:`IMAGE_COLUMN_CANDIDATES`; the first of
    :data:`CAPTION_COLUMN_CANDIDATES`, else all ``caption_<k>`` columns. Captions are not validated here.
    """
    image_column = image_column or _guess_image_column(dataset)
    if image_column is None:
        raise DatasetUnavailableError(
            f"{where} has no image column; its columns are {dataset.column_names}. Pass image_column=<one of them>."
        )
    require_column(dataset, image_column, where, "image_column=<one of them>")
    if caption_column is None:
        caption_columns = _guess_caption_columns(dataset)
        if not caption_columns:
            raise DatasetUnavailableError(
                f"{where} has no caption column; its columns are {dataset.column_names}. "
                "Pass caption_column=<one of them>."
            )
    else:
        caption_columns = [caption_column] if isinstance(caption_column, str) else list(caption_column)
    for column in caption_columns:
        require_column(dataset, column, where, "caption_column=<one of them>")
    if image_column != IMAGE_COLUMN and IMAGE_COLUMN in dataset.column_names:
        raise DatasetUnavailableError(
            f"{where} has a column {IMAGE_COLUMN!r} besides the image column {image_column!r}; rename or remove one "
            f"of them (dataset.remove_columns({IMAGE_COLUMN!r}))."
        )
    if len(caption_columns) == 1:
        captions = [as_caption_list(value) for value in dataset[caption_columns[0]]]
    else:
        columns = [dataset[column] for column in caption_columns]
        captions = [
            [value for values in row for value in (as_caption_list(values) or [None])]
            for row in zip(*columns, strict=True)
        ]
    captions = [_as_strings(row) for row in captions]
    dataset = dataset.remove_columns(caption_columns)
    if CAPTIONS_COLUMN in dataset.column_names:  # a caption column named otherwise beside a "captions" column
        dataset = dataset.remove_columns(CAPTIONS_COLUMN)
    dataset = dataset.add_column(CAPTIONS_COLUMN, captions, feature=_CAPTIONS_FEATURE)
    if image_column != IMAGE_COLUMN:
        dataset = dataset.rename_column(image_column, IMAGE_COLUMN)
    return _undecoded(dataset, IMAGE_COLUMN)


def _as_strings(captions: list[Any] | None) -> list[str | None] | None:
    """Captions as an Arrow ``list<string>`` can hold them: non-strings become ``None`` (reported as missing)."""
    if captions is None:
        return None
    return [caption if isinstance(caption, str) else None for caption in captions]


def select_karpathy_split(
    dataset: datasets.Dataset, split: str, column: str = "split", where: str = "the dataset"
) -> datasets.Dataset:
    """The rows whose ``column`` (Karpathy's split: ``train``, ``val``, ``test``, COCO's ``restval``) is ``split``.

    ``split`` may join splits with ``+`` (``"train+restval"``); ``validation``/``valid``/``dev`` mean ``val``. Rows
    keep their order. Raises :class:`DatasetUnavailableError` listing the split values present.
    """
    require_column(dataset, column, where, "the Karpathy split column")
    parts = [KARPATHY_SPLIT_ALIASES.get(part.strip(), part.strip()) for part in split.split("+")]
    values = np.asarray(dataset[column], dtype=object)
    present = sorted({str(value) for value in values})
    missing = [part for part in parts if part not in present]
    if missing:
        raise DatasetUnavailableError(
            f"{where} has no Karpathy split {missing[0]!r}; its {column!r} column holds {present}. Pass one of them "
            "(join splits with '+', e.g. 'train+restval')."
        )
    return dataset.select(np.flatnonzero(np.isin(values, parts)))


# -------------------------------------------------------------------------------------------------------- loading


def _load_all_rows(
    source: str,
    where: str,
    config_name: str | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    hint: str | None = None,
) -> datasets.Dataset:
    """Every row of ``source`` (all its splits, concatenated in order): a Hub dataset, a ``save_to_disk`` folder, a
    folder of data files or a single parquet/arrow/csv/json file."""
    path = os.path.expanduser(source)
    if not os.path.exists(path) and looks_like_local_path(path):
        raise DatasetUnavailableError(_missing_path_message(path))
    try:
        if os.path.isdir(path) and _is_saved_to_disk(path):
            loaded = datasets.load_from_disk(path)
        elif os.path.isfile(path):
            builder = LOCAL_FILE_BUILDERS.get(os.path.splitext(path)[1])
            if builder is None:
                raise DatasetUnavailableError(
                    f"cannot read {path!r}: a single file must be one of {sorted(LOCAL_FILE_BUILDERS)}"
                )
            loaded = datasets.load_dataset(builder, data_files={"train": path}, cache_dir=cache_dir)
        else:
            try:
                loaded = datasets.load_dataset(path, config_name, data_dir=data_dir, cache_dir=cache_dir)
            except RuntimeError as error:  # a loading-script repository: try the Hub's parquet conversion
                if "scripts are no longer supported" not in str(error) or os.path.exists(path):
                    raise
                loaded = datasets.load_dataset(
                    path, config_name, data_dir=data_dir, cache_dir=cache_dir, revision="refs/convert/parquet"
                )
    except DatasetUnavailableError:
        raise
    except Exception as error:  # network, missing repository, gated access, corrupt files
        local = os.path.exists(path)
        fix = hint or (
            "Check that it holds parquet/arrow files or a save_to_disk copy." if local else _offline_hint(source)
        )
        raise DatasetUnavailableError(f"could not load {where} ({type(error).__name__}: {error}). {fix}") from error
    if isinstance(loaded, datasets.Dataset):
        return loaded
    parts = list(loaded.values())
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _flickr30k_hint() -> str:
    return (
        f"{FLICKR30K} is a loading-script dataset, which datasets >= 4 no longer runs; without the Hub's parquet "
        f"conversion, download the repository (`hf download {FLICKR30K} --repo-type dataset --local-dir DIR`), "
        f"unzip DIR/{_FLICKR30K_IMAGES}.zip into DIR and pass DIR."
    )


def _flickr30k_from_repository(folder: str) -> datasets.Dataset:
    """The ``nlphuji/flickr30k`` repository as downloaded (its CSV + the extracted image folder) in the Hub schema."""
    import pandas as pd

    images = os.path.join(folder, _FLICKR30K_IMAGES)
    if not os.path.isdir(images):
        archive = f"{images}.zip"
        fix = f"unzip {archive} -d {folder}" if os.path.isfile(archive) else f"put the images in {images}"
        raise DatasetUnavailableError(
            f"the Flickr30k copy at {folder!r} has {_FLICKR30K_CSV} but no image folder {images!r}; {fix}."
        )
    table = pd.read_csv(os.path.join(folder, _FLICKR30K_CSV), dtype=str, keep_default_na=False)
    captions_column = "raw" if "raw" in table.columns else "caption"
    missing = sorted({captions_column, "sentids", "split", "filename", "img_id"} - set(table.columns))
    if missing:
        raise DatasetUnavailableError(
            f"{_FLICKR30K_CSV} in {folder!r} lacks column(s) {missing}; its columns are {list(table.columns)}."
        )
    features = datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "caption": _CAPTIONS_FEATURE,
            "sentids": datasets.List(datasets.Value("string")),
            "split": datasets.Value("string"),
            "img_id": datasets.Value("string"),
            "filename": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": None, "path": os.path.join(images, name)} for name in table["filename"]],
            "caption": [_as_strings(as_caption_list(_json_list(text))) for text in table[captions_column]],
            "sentids": [[str(s) for s in _json_list(text) or []] for text in table["sentids"]],
            "split": list(table["split"]),
            "img_id": list(table["img_id"]),
            "filename": list(table["filename"]),
        },
        features=features,
    )


def _json_list(text: str) -> Any:
    """A JSON-encoded list as the Flickr30k CSV stores it; other text is one caption; empty text is ``None``."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, list) else text


def load_flickr30k(
    split: str = "train",
    source: str = FLICKR30K,
    drop_bad_rows: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Karpathy's split of Flickr30k (29,000 ``train`` / 1,014 ``val`` / 1,000 ``test`` images, 5 captions each).

    ``source`` is the Hub dataset ``nlphuji/flickr30k`` or a local copy of it. Its schema: one Hub split
    ``test`` holding all 31,014 rows, columns ``image`` (Image), ``caption`` (5 strings), ``sentids`` (5 strings),
    ``split`` (str: Karpathy's ``train``/``val``/``test``), ``img_id`` (str), ``filename`` (str). A local copy is
    a ``save_to_disk`` folder, a parquet file or folder with those columns, or the repository as downloaded
    (``hf download nlphuji/flickr30k --repo-type dataset --local-dir DIR``: ``flickr_annotations_30k.csv``, whose
    ``raw`` and ``sentids`` hold JSON lists, and ``flickr30k-images.zip``, to be extracted into
    ``DIR/flickr30k-images``). The Hub repository is a loading script, which ``datasets >= 4`` no longer runs, so
    the Hub id is read from the Hub's parquet conversion (``revision="refs/convert/parquet"``) when the script is
    refused.

    The rows are chosen by the ``split`` column (``"train+val"`` joins; ``"validation"`` means ``"val"``). Returns
    the rows with ``image`` (undecoded), ``captions`` (the 5 captions) and the other columns.
    """
    where = f"{source!r}" if source != FLICKR30K else f"the Hub dataset {FLICKR30K!r}"
    path = os.path.expanduser(source)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, _FLICKR30K_CSV)):
        dataset = _flickr30k_from_repository(path)
    else:
        dataset = _load_all_rows(source, where, cache_dir=cache_dir, hint=_flickr30k_hint())
    dataset = normalise_image_text(dataset, IMAGE_COLUMN, "caption", where)
    dataset = select_karpathy_split(dataset, split, "split", where)
    return _check_rows(dataset, f"split {split!r} of {where}", drop_bad_rows)


def _coco_image_path(root: str, filepath: str | None, filename: str) -> str:
    """``root/filepath/filename`` (COCO's layout: ``train2014/``, ``val2014/``), else ``root/filename`` if only that
    exists (all images in one folder)."""
    nested = os.path.join(root, filepath or "", filename)
    flat = os.path.join(root, filename)
    return flat if not os.path.isfile(nested) and os.path.isfile(flat) else nested


def load_coco_karpathy(
    split: str = "train",
    image_root: str | None = None,
    source: str = COCO_KARPATHY,
    drop_bad_rows: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Karpathy's split of COCO 2014 captions: 82,783 ``train``, 30,504 ``restval``, 5,000 ``val`` and 5,000 ``test``
    images, about 5 captions each; ``"train+restval"`` is the 113,287-image training set most papers use.

    ``source`` is the Hub dataset ``yerevann/coco-karpathy`` (parquet; Hub splits ``train``/``validation``/``test``,
    columns ``filepath`` (``"train2014"``/``"val2014"``), ``filename`` (``"COCO_val2014_000000391895.jpg"``),
    ``sentences`` (list of caption strings), ``sentids``, ``imgid``, ``split`` (Karpathy's split), ``cocoid``,
    ``url``) or a local copy of it (``save_to_disk``, parquet file or folder). It holds no pixels: pass
    ``image_root``, the folder holding COCO's ``train2014/`` and ``val2014/`` (``images.cocodataset.org/zips/
    {train,val}2014.zip``); each image is ``image_root/filepath/filename`` (or ``image_root/filename`` when all images
    are in one folder). A copy that does carry an ``image`` column needs no ``image_root``.

    The rows are chosen by the ``split`` column (all Hub splits are read), so a split is the same whatever Hub split
    holds it. A missing ``image_root`` or image file raises an error naming it.
    """
    where = f"{source!r}" if source != COCO_KARPATHY else f"the Hub dataset {COCO_KARPATHY!r}"
    dataset = _load_all_rows(source, where, cache_dir=cache_dir)
    caption_column = "sentences" if "sentences" in dataset.column_names else "caption"
    for column in ("filename", "split", caption_column):
        require_column(dataset, column, where, "a copy with the yerevann/coco-karpathy columns")
    if image_root is None:
        if IMAGE_COLUMN not in dataset.column_names:
            raise DatasetUnavailableError(
                f"{where} holds no pixels, only file names (filepath/filename) and URLs: pass image_root=DIR, the "
                "folder holding COCO 2014's train2014/ and val2014/ (from images.cocodataset.org/zips/train2014.zip "
                "and val2014.zip)."
            )
        dataset = normalise_image_text(dataset, IMAGE_COLUMN, caption_column, where)
        return _check_rows(
            select_karpathy_split(dataset, split, "split", where), f"split {split!r} of {where}", drop_bad_rows
        )
    root = os.path.abspath(os.path.expanduser(image_root))
    if not os.path.isdir(root):
        raise DatasetUnavailableError(
            f"image_root={image_root!r} is not a folder (looked for {root}); pass the folder holding COCO 2014's "
            "train2014/ and val2014/."
        )
    if IMAGE_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(IMAGE_COLUMN)
    dataset = select_karpathy_split(dataset, split, "split", where).flatten_indices()
    filepaths = dataset["filepath"] if "filepath" in dataset.column_names else [None] * len(dataset)
    paths = [_coco_image_path(root, fp, fn) for fp, fn in zip(filepaths, dataset["filename"], strict=True)]
    dataset = dataset.add_column(
        IMAGE_COLUMN, [{"bytes": None, "path": p} for p in paths], feature=datasets.Image(decode=False)
    )
    dataset = normalise_image_text(dataset, IMAGE_COLUMN, caption_column, where)
    fix = f"Check that image_root={image_root!r} holds train2014/ and val2014/ with every image. "
    return _check_rows(dataset, f"split {split!r} of {where}", drop_bad_rows, fix)


def load_captioned_images(
    name_or_path: str,
    split: str,
    image_column: str | None = None,
    caption_column: str | Sequence[str] | None = None,
    drop_bad_rows: bool = False,
    config_name: str | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """One split of images with captions in columns, wherever it lives (see :func:`~emc2_hf.data.load_image_split`):

    * a local imagefolder with captions: ``DIR/[<split>/]metadata.jsonl`` (or ``metadata.csv``) beside the images,
      each record a ``file_name`` and a ``caption`` (a string, or in ``metadata.jsonl`` a list of strings) — the
      ``datasets`` imagefolder convention; a folder without split sub-folders is split ``"train"``;
    * a parquet file or folder (a downloaded Hub repository) with an image column and a caption column (a string or
      a list of strings per row);
    * a ``save_to_disk`` folder, or a Hub dataset with such columns.

    Column names default to a guess (see :func:`normalise_image_text`); ``caption_column`` may list several columns.
    """
    dataset = load_image_split(name_or_path, split, config_name=config_name, data_dir=data_dir, cache_dir=cache_dir)
    where = f"split {split!r} of {name_or_path!r}"
    dataset = normalise_image_text(dataset, image_column, caption_column, where)
    return _check_rows(dataset, where, drop_bad_rows)


def digit_captions(label: int) -> list[str]:
    """The captions of a digit image of class ``label`` (0–9): :data:`DIGIT_CAPTION_TEMPLATES` filled in."""
    return [template.format(name=DIGIT_CLASS_NAMES[label], digit=label) for template in DIGIT_CAPTION_TEMPLATES]


def load_digits_captions(image_size: int = 32, seed: int = 0, test_size: float = 0.3) -> datasets.DatasetDict:
    """scikit-learn's digits (:func:`~emc2_hf.data.load_digits_dataset`) with template captions; needs no network.

    Every image gets the 5 captions of its class (:func:`digit_captions`, e.g. ``"a photo of the digit three"``,
    ``"a handwritten 3"``), so images of one class share captions: in a batch they are each other's false negatives,
    as in any small-vocabulary caption set. Class names are :data:`DIGIT_CLASS_NAMES` (for zero-shot prompts).

    Returns:
        ``DatasetDict`` with splits ``"train"`` (1,257 rows at ``test_size=0.3``) and ``"test"`` (540), columns
        ``image`` (undecoded PNG, ``image_size`` px, mode ``"L"``), ``label`` (ClassLabel ``"0"``…``"9"``) and
        ``captions``.
    """
    digits = load_digits_dataset(image_size=image_size, test_size=test_size, seed=seed)
    splits = {}
    for name, part in digits.items():
        captions = [digit_captions(int(label)) for label in part["label"]]
        splits[name] = _undecoded(part, IMAGE_COLUMN).add_column(CAPTIONS_COLUMN, captions, feature=_CAPTIONS_FEATURE)
    return datasets.DatasetDict(splits)


def _local_column_names(path: str) -> list[str] | None:
    """The columns of a local copy without loading it (saved dataset, parquet file/folder), or ``None``."""
    import pyarrow.parquet as pq

    if os.path.isdir(path) and _is_saved_to_disk(path):
        saved = datasets.load_from_disk(path)
        return saved.column_names if isinstance(saved, datasets.Dataset) else next(iter(saved.values())).column_names
    if os.path.isfile(path) and path.endswith(".parquet"):
        return pq.read_schema(path).names
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if files:
            return pq.read_schema(files[0]).names
    return None


def image_text_schema(name_or_path: str) -> str:
    """Which loader reads ``name_or_path``: ``"digits"``, ``"flickr30k"`` (``nlphuji/flickr30k`` or a copy: columns
    ``caption``, ``split``, ``img_id``, ``filename``, or its CSV), ``"coco-karpathy"`` (``yerevann/coco-karpathy`` or a
    copy: ``filepath``, ``filename``, ``sentences``, ``split``) or ``"captions"`` (any other: images and caption
    columns)."""
    if name_or_path == DIGITS:
        return "digits"
    if name_or_path.lower() == FLICKR30K:
        return "flickr30k"
    if name_or_path.lower() == COCO_KARPATHY:
        return "coco-karpathy"
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, _FLICKR30K_CSV)):
        return "flickr30k"
    columns = set(_local_column_names(path) or ()) if os.path.exists(path) else set()
    if _FLICKR30K_COLUMNS <= columns:
        return "flickr30k"
    if _COCO_KARPATHY_COLUMNS <= columns:
        return "coco-karpathy"
    return "captions"


def load_image_text_split(
    name_or_path: str,
    split: str,
    image_column: str | None = None,
    caption_column: str | Sequence[str] | None = None,
    image_root: str | None = None,
    drop_bad_rows: bool = False,
    config_name: str | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    image_size: int = 32,
) -> datasets.Dataset:
    """One split of an image–caption dataset, normalised to ``image`` + ``captions`` (see the module doc).

    Dispatches by :func:`image_text_schema`: ``"digits"`` → :func:`load_digits_captions` (splits ``train``/``test``,
    ``image_size`` px); ``nlphuji/flickr30k`` or a copy → :func:`load_flickr30k`; ``yerevann/coco-karpathy`` or a copy
    → :func:`load_coco_karpathy` (with ``image_root``); anything else → :func:`load_captioned_images` (with
    ``image_column``/``caption_column``). For Flickr30k and COCO, ``split`` is Karpathy's (``train``, ``val``,
    ``test``, COCO's ``restval``; join with ``+``).

    Raises:
        DatasetUnavailableError: the data or split cannot be loaded (the message says what was tried and the fix).
        ImageTextDataError: a row has no usable caption or image file, unless ``drop_bad_rows``.
    """
    schema = image_text_schema(name_or_path)
    if schema == "digits":
        splits = load_digits_captions(image_size=image_size)
        if split not in splits:
            raise DatasetUnavailableError(f"{DIGITS!r} has no split {split!r}; its splits are {list(splits)}.")
        return splits[split]
    if schema == "flickr30k":
        return load_flickr30k(split, name_or_path, drop_bad_rows=drop_bad_rows, cache_dir=cache_dir)
    if schema == "coco-karpathy":
        return load_coco_karpathy(split, image_root, name_or_path, drop_bad_rows=drop_bad_rows, cache_dir=cache_dir)
    return load_captioned_images(
        name_or_path, split, image_column, caption_column, drop_bad_rows, config_name, data_dir, cache_dir
    )
