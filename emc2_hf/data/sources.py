"""Load an image split from the Hub or from a local copy, with errors that say what was tried and how to fix it."""

from __future__ import annotations

import os

import datasets

LOCAL_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


class DatasetUnavailableError(RuntimeError):
    """A dataset or split could not be loaded; the message names what was tried and how to point at a local copy."""


def _offline_hint(name: str) -> str:
    return (
        f"Without network, make a local copy on a machine that has one and point --dataset_name at it: either "
        f"`datasets.load_dataset({name!r}).save_to_disk(DIR)`, or "
        f"`hf download {name} --repo-type dataset --local-dir DIR` (parquet files), or a folder of images laid out "
        f"as DIR/<split>/<class>/<image> (imagefolder); then pass --dataset_name DIR. "
        f"--dataset_name digits runs the offline demo on scikit-learn's bundled digits."
    )


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hub dataset id (``"name"`` or ``"owner/name"``).

    A path starts with ``/``, ``.`` or ``~``, has more than one ``/``, or starts with a folder that exists here.
    """
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def _missing_path_message(name: str) -> str:
    path = os.path.abspath(os.path.expanduser(name))
    message = f"no such file or folder {name!r}"
    if path != name:
        message += f" (looked for {path})"
    parent = os.path.dirname(path)
    while parent and not os.path.isdir(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if os.path.isdir(parent):
        entries = sorted(os.listdir(parent))
        shown = ", ".join(entries[:12]) + (", ..." if len(entries) > 12 else "")
        message += f"; {parent} holds: {shown or 'nothing'}"
    return message + ". Check the path (a Hub dataset is named 'owner/name')."


class SingleSplitError(DatasetUnavailableError):
    """A split other than ``train`` was asked of data that has no splits (one file, or one saved ``Dataset``)."""


SINGLE_SPLIT = "train"


def _single_split(dataset: datasets.Dataset, where: str, split: str) -> datasets.Dataset:
    """``dataset`` as the only split, ``"train"``; any other split name is refused rather than silently ignored."""
    parts = [part.strip() for part in split.split("+")]
    if all(part == SINGLE_SPLIT for part in parts):
        return dataset
    other = next(part for part in parts if part != SINGLE_SPLIT)
    raise SingleSplitError(
        f"{where} is a single dataset without splits ({len(dataset)} rows, read as split {SINGLE_SPLIT!r}), so it "
        f"has no split {other!r}. Measure the probes on a seeded hold-out of it with --eval_holdout_fraction 0.2 "
        f"(recipes; --probe_train_split {SINGLE_SPLIT}), or point --dataset_name at a folder with one file per split."
    )


def _is_saved_to_disk(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


def _from_disk(path: str, split: str) -> datasets.Dataset:
    """``split`` (``"a"`` or ``"a+b"``) of a folder written by ``save_to_disk``."""
    saved = datasets.load_from_disk(path)
    if isinstance(saved, datasets.Dataset):
        return _single_split(saved, f"the dataset saved at {path!r}", split)
    parts = [part.strip() for part in split.split("+")]
    missing = [part for part in parts if part not in saved]
    if missing:
        raise DatasetUnavailableError(
            f"the dataset saved at {path!r} has no split {missing[0]!r}; its splits are {list(saved)}. "
            "Pass one of them (recipes: --train_split / --probe_train_split / --eval_split; join splits with '+')."
        )
    chosen = [saved[part] for part in parts]
    return chosen[0] if len(chosen) == 1 else datasets.concatenate_datasets(chosen)


def load_image_split(
    name: str,
    split: str,
    config_name: str | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    image_column: str | None = None,
) -> datasets.Dataset:
    """One split of an image dataset, wherever it lives.

    ``name`` may be

    * a Hub dataset (``"jxie/stl10"``, ``"clane9/imagenet-100"``), loaded with ``datasets.load_dataset``;
    * a local folder written by ``save_to_disk``;
    * a local folder of parquet/arrow files (a downloaded Hub repository, whose file names give the splits, e.g.
      ``data/unlabeled-00000-of-00001.parquet``) or of images (``imagefolder``: ``DIR/<split>/<class>/<image>``);
    * a single local parquet/arrow file.

    Data without splits (one file, or one saved ``Dataset``) is the split ``"train"``; asking it for another split
    raises :class:`SingleSplitError` (never the training rows under another name). ``split`` accepts ``"a+b"`` to
    concatenate splits (STL-10: ``"unlabeled+train"``). A name that looks like a path (see
    :func:`looks_like_local_path`) but does not exist is reported as a missing path, not a missing Hub dataset. Raises
    :class:`DatasetUnavailableError` naming the dataset and split that failed, why, and how to use a local copy; and,
    if ``image_column`` is given and missing, one listing the columns that exist.
    """
    where = f"{name!r}" + (f" (configuration {config_name!r})" if config_name else "")
    name = os.path.expanduser(name)
    if not os.path.exists(name) and looks_like_local_path(name):
        raise DatasetUnavailableError(_missing_path_message(name))
    try:
        if os.path.isdir(name) and _is_saved_to_disk(name):
            dataset = _from_disk(name, split)
        elif os.path.isfile(name):
            builder = LOCAL_FILE_BUILDERS.get(os.path.splitext(name)[1])
            if builder is None:
                raise DatasetUnavailableError(
                    f"cannot read {name!r}: a single file must be one of {sorted(LOCAL_FILE_BUILDERS)}; "
                    "pass a folder for imagefolder data"
                )
            dataset = datasets.load_dataset(builder, data_files={"train": name}, split="train", cache_dir=cache_dir)
            dataset = _single_split(dataset, f"the file {name!r}", split)
        else:
            dataset = datasets.load_dataset(name, config_name, split=split, data_dir=data_dir, cache_dir=cache_dir)
    except DatasetUnavailableError:
        raise
    except ValueError as error:
        if "split" in str(error).lower():
            raise DatasetUnavailableError(
                f"dataset {where} has no split {split!r} ({error}). Pass an existing split (recipes: --train_split / "
                "--probe_train_split / --eval_split; join splits with '+')."
            ) from error
        raise DatasetUnavailableError(f"could not load split {split!r} of dataset {where}: {error}") from error
    except Exception as error:  # network, missing repository, gated access, corrupt files
        local = os.path.exists(name)
        raise DatasetUnavailableError(
            f"could not load split {split!r} of {'the local dataset' if local else 'the Hub dataset'} {where} "
            f"({type(error).__name__}: {error}). "
            + (
                "Check that the folder holds parquet/arrow files, an imagefolder or a save_to_disk copy."
                if local
                else _offline_hint(name)
            )
        ) from error
    if isinstance(dataset, datasets.IterableDataset):  # pragma: no cover - load_dataset without streaming
        raise DatasetUnavailableError(f"{where} loaded as a streaming dataset; per-sample state needs a map-style one")
    if image_column is not None:
        require_column(dataset, image_column, f"split {split!r} of {where}", "--image_column")
    return dataset


def require_column(dataset: datasets.Dataset, column: str, what: str, flag: str) -> None:
    """Raise :class:`DatasetUnavailableError` naming ``what`` and the columns that exist if ``column`` is missing."""
    if column not in dataset.column_names:
        raise DatasetUnavailableError(
            f"{what} has no column {column!r}; its columns are {dataset.column_names}. Pass {flag} <one of them>."
        )
