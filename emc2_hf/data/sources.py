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


def _is_saved_to_disk(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))


def _from_disk(path: str, split: str) -> datasets.Dataset:
    """``split`` (``"a"`` or ``"a+b"``) of a folder written by ``save_to_disk``."""
    saved = datasets.load_from_disk(path)
    if isinstance(saved, datasets.Dataset):
        return saved
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
    * a single local parquet/arrow file (then ``split`` only names it).

    ``split`` accepts ``"a+b"`` to concatenate splits (STL-10: ``"unlabeled+train"``). Raises
    :class:`DatasetUnavailableError` naming the dataset and split that failed, why, and how to use a local copy; and,
    if ``image_column`` is given and missing, one listing the columns that exist.
    """
    where = f"{name!r}" + (f" (configuration {config_name!r})" if config_name else "")
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
