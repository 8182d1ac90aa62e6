"""The data pipeline: decoding, augmentations, the two-view collator, the digits dataset, dataset indices."""

import io
import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from emc2_hf.data import (
    ContrastiveCollator,
    SimCLRAugmentation,
    decode_image,
    load_digits_dataset,
    with_dataset_index,
)


def solid(color, size=20, mode="RGB") -> Image.Image:
    return Image.new(mode, (size, size), color)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def geometric_only(size=16) -> SimCLRAugmentation:
    return SimCLRAugmentation(
        image_size=size, color_jitter_probability=0.0, grayscale_probability=0.0, blur_probability=0.0
    )


def test_collator_returns_two_views_per_row_then_the_dataset_indices():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    rows = [{"image": solid(c), "dataset_index": 10 + i} for i, c in enumerate(colours)]
    batch = ContrastiveCollator(augmentation=geometric_only())(rows)
    assert batch["pixel_values"].shape == (8, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["dataset_index"].tolist() == [10, 11, 12, 13]
    # Solid colours survive crops and flips: view k and view k + b come from row k.
    means = batch["pixel_values"].mean(dim=(2, 3))
    assert torch.allclose(means[:4], means[4:], atol=1e-4)
    assert not torch.allclose(means[0], means[1])


def test_the_two_views_are_independent_random_augmentations():
    gradient = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)))
    batch = ContrastiveCollator(augmentation=SimCLRAugmentation(image_size=32))(
        [{"image": gradient, "dataset_index": 0}, {"image": gradient, "dataset_index": 1}]
    )
    assert not torch.allclose(batch["pixel_values"][0], batch["pixel_values"][2])


def test_grayscale_rgba_arrays_tensors_and_undecoded_images_become_rgb():
    inputs = [
        solid(128, mode="L"),
        solid((10, 20, 30, 40), mode="RGBA"),
        np.full((12, 12), 200, dtype=np.uint8),
        np.random.rand(12, 12, 3).astype(np.float32),
        torch.rand(3, 12, 12),
        {"bytes": png_bytes(solid((1, 2, 3))), "path": None},
        png_bytes(solid(7, mode="L")),
    ]
    for value in inputs:
        image = decode_image(value, row=0)
        assert image.mode == "RGB"


def test_undecoded_dataset_images_are_decoded_by_the_collator():
    dataset = datasets.Dataset.from_dict(
        {"image": [solid((9, 9, 9)), solid(3, mode="L")]}, features=datasets.Features({"image": datasets.Image()})
    )
    prepared = with_dataset_index(dataset, "image", "dataset_index")
    assert isinstance(prepared[0]["image"], dict)  # left undecoded for the collator
    batch = ContrastiveCollator(augmentation=geometric_only())([prepared[0], prepared[1]])
    assert batch["dataset_index"].tolist() == [0, 1]


def test_a_corrupt_image_names_its_row():
    rows = [
        {"image": solid((1, 1, 1)), "dataset_index": 4},
        {"image": {"bytes": b"not an image", "path": None}, "dataset_index": 17},
    ]
    with pytest.raises(ValueError, match=r"row 17 .*fix or remove that row"):
        ContrastiveCollator(augmentation=geometric_only())(rows)
    with pytest.raises(ValueError, match="row 3 .* missing"):
        decode_image(None, row=3)


def test_missing_image_column_lists_the_columns_and_the_fix():
    rows = [{"img": solid(1, mode="L"), "label": 0, "dataset_index": 0}] * 2
    with pytest.raises(KeyError, match=r"no column 'image'.*\['dataset_index', 'img', 'label'\].*image_column"):
        ContrastiveCollator()(rows)


def test_missing_index_column_says_how_to_add_it():
    with pytest.raises(KeyError, match="with_indices=True"):
        ContrastiveCollator()([{"image": solid(1)}, {"image": solid(2)}])


def test_a_batch_of_one_image_has_no_negatives():
    with pytest.raises(ValueError, match="at least 2 images per batch.*dataloader_drop_last"):
        ContrastiveCollator()([{"image": solid(1), "dataset_index": 0}])


def test_a_repeated_index_in_a_batch_is_refused():
    rows = [{"image": solid(1), "dataset_index": 5}, {"image": solid(2), "dataset_index": 5}]
    with pytest.raises(ValueError, match=r"\[5\] appear twice"):
        ContrastiveCollator()(rows)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, "image_size"),
        ({"crop_scale": (0.9, 0.2)}, "crop_scale"),
        ({"grayscale_probability": 1.5}, "grayscale_probability"),
        ({"hue": 0.7}, "hue"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
        ({"brightness": -1.0}, "brightness"),
    ],
)
def test_bad_augmentation_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimCLRAugmentation(**kwargs)


def test_eval_transform_is_deterministic_and_sized():
    augmentation = SimCLRAugmentation(image_size=24)
    image = Image.fromarray((np.random.rand(40, 30, 3) * 255).astype(np.uint8))
    first, second = augmentation.eval_transform(image), augmentation.eval_transform(image)
    assert first.shape == (3, 24, 24) and torch.equal(first, second)


def test_collator_pickles_and_runs_in_dataloader_workers():
    collator = ContrastiveCollator(augmentation=geometric_only())
    collator.augmentation.train_transform(solid(1))  # build the cached transform before pickling
    assert pickle.loads(pickle.dumps(collator)).augmentation.image_size == 16
    rows = [{"image": solid((i * 20, 0, 0)), "dataset_index": i} for i in range(8)]
    loader = torch.utils.data.DataLoader(rows, batch_size=4, num_workers=2, collate_fn=collator)
    batches = list(loader)
    assert [b["dataset_index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_digits_dataset_schema_and_stratified_split():
    splits = load_digits_dataset(image_size=24, seed=0)
    assert len(splits["train"]) == 1257 and len(splits["test"]) == 540
    assert splits["train"].features["label"].names == [str(d) for d in range(10)]
    image = splits["train"][0]["image"]
    assert image.size == (24, 24)
    for split in ("train", "test"):
        counts = np.bincount(splits[split]["label"], minlength=10)
        assert counts.min() >= 0.09 * len(splits[split]) and counts.max() <= 0.11 * len(splits[split])
    assert splits["test"][0]["image"] == load_digits_dataset(image_size=24, seed=0)["test"][0]["image"]


def test_dataset_index_column_is_added_and_checked():
    dataset = datasets.Dataset.from_dict({"image": [solid(1), solid(2), solid(3)]})
    prepared = with_dataset_index(dataset, "image", "dataset_index")
    assert prepared["dataset_index"] == [0, 1, 2]
    shuffled = prepared.select([2, 0, 1])
    with pytest.raises(ValueError, match="must hold each row's position"):
        with_dataset_index(shuffled, "image", "dataset_index")
    with pytest.raises(ValueError, match="at least 2 images"):
        with_dataset_index(dataset.select([0]), "image", "dataset_index")
