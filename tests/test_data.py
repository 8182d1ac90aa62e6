"""The data pipeline: decoding, augmentations, the two-view collator, the digits dataset, dataset indices."""

import io
import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from emc2_hf.data import (
    ContrastiveCollator,
    SimCLRAugmentation,
    decode_image,
    load_digits_dataset,
    with_dataset_index,
)

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def solid(color, size=20, mode="RGB") -> Image.Image:
    return Image.new(mode, (size, size), color)


def encoded(image: Image.Image, format="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def geometric_only(size=16) -> SimCLRAugmentation:
    """Crops and flips only: a solid-colour image keeps its colour in every view."""
    return SimCLRAugmentation(
        image_size=size, color_jitter_probability=0.0, grayscale_probability=0.0, blur_probability=0.0
    )


def gradient(size=64) -> Image.Image:
    ramp = np.tile(np.arange(size, dtype=np.uint8) * (256 // size), (size, 1))
    return Image.fromarray(np.stack([ramp, ramp.T, 255 - ramp], axis=-1))


def normalised(color, augmentation: SimCLRAugmentation) -> torch.Tensor:
    """The per-channel value a solid ``color`` has after normalisation: ``[3]``."""
    mean, std = torch.tensor(augmentation.mean), torch.tensor(augmentation.std)
    return (torch.tensor(color, dtype=torch.float32) / 255 - mean) / std


# ContrastiveCollator: output


def test_collator_puts_view_one_of_every_row_first_then_view_two():
    augmentation = geometric_only()
    colours = [RED, GREEN, BLUE, YELLOW]
    rows = [{"image": solid(c), "dataset_index": 10 + i, "label": i} for i, c in enumerate(colours)]
    batch = ContrastiveCollator(augmentation=augmentation)(rows)

    assert set(batch) == {"pixel_values", "dataset_index", "view_keys", "view_slots"}
    assert batch["view_slots"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # each view of an image keeps its own chain
    assert batch["view_keys"].tolist() == [-1] * 8  # unseeded views cannot be re-created
    assert batch["pixel_values"].shape == (8, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["dataset_index"].dtype == torch.long and batch["dataset_index"].tolist() == [10, 11, 12, 13]
    # Solid colours survive crops and flips, so row k's colour must appear at k (view 1) and k + b (view 2).
    channel_means = batch["pixel_values"].mean(dim=(2, 3))
    for k, colour in enumerate(colours):
        assert torch.allclose(channel_means[k], normalised(colour, augmentation), atol=1e-4)
        assert torch.allclose(channel_means[k + 4], normalised(colour, augmentation), atol=1e-4)


def test_the_two_views_of_a_row_are_independent_augmentations():
    torch.manual_seed(0)
    image = gradient()
    batch = ContrastiveCollator(augmentation=SimCLRAugmentation(image_size=32))(
        [{"image": image, "dataset_index": 0}, {"image": image, "dataset_index": 1}]
    )
    views = batch["pixel_values"]
    assert not torch.allclose(views[0], views[2])  # row 0: view 1 vs view 2
    assert not torch.allclose(views[1], views[3])  # row 1
    assert not torch.allclose(views[0], views[1])  # same image in two rows: still independent


def test_the_output_index_key_follows_index_column():
    collator = ContrastiveCollator(augmentation=geometric_only(), image_column="img", index_column="idx")
    batch = collator([{"img": solid(RED), "idx": 3}, {"img": solid(BLUE), "idx": 1}])
    assert batch["idx"].tolist() == [3, 1]
    assert collator.required_columns == ["img", "idx"]
    assert ContrastiveCollator().required_columns == ["image", "dataset_index"]


def test_eval_pixel_values_is_the_deterministic_transform_of_each_image():
    augmentation = SimCLRAugmentation(image_size=12)
    collator = ContrastiveCollator(augmentation=augmentation)
    images = [solid(RED, size=30), np.full((20, 40), 255, dtype=np.uint8), gradient(32)]
    pixel_values = collator.eval_pixel_values(images)
    assert pixel_values.shape == (3, 3, 12, 12) and pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values, collator.eval_pixel_values(images))
    assert torch.allclose(pixel_values[0].mean(dim=(1, 2)), normalised(RED, augmentation), atol=1e-4)
    assert torch.allclose(pixel_values[1].mean(dim=(1, 2)), normalised((255, 255, 255), augmentation), atol=1e-4)


# ContrastiveCollator: errors


def test_a_missing_image_column_lists_the_columns_and_suggests_the_image_one():
    rows = [{"img": solid(RED), "label": 0, "dataset_index": i} for i in range(2)]
    with pytest.raises(KeyError) as error:
        ContrastiveCollator()(rows)
    message = str(error.value)
    assert "no column 'image'" in message
    assert "['dataset_index', 'img', 'label']" in message
    assert "image_column='img'" in message and "--image_column img" in message


def test_a_missing_image_column_in_a_later_row_is_reported_too():
    rows = [{"image": solid(RED), "dataset_index": 0}, {"picture": solid(BLUE), "dataset_index": 1}]
    with pytest.raises(KeyError, match=r"no column 'image'.*\['dataset_index', 'picture'\]"):
        ContrastiveCollator(augmentation=geometric_only())(rows)


def test_a_missing_index_column_says_the_trainer_adds_it_or_how_to_add_it():
    with pytest.raises(KeyError) as error:
        ContrastiveCollator()([{"image": solid(RED)}, {"image": solid(BLUE)}])
    message = str(error.value)
    assert "no column 'dataset_index'" in message and "ContrastiveTrainer adds it" in message
    assert 'dataset.map(lambda _, i: {"dataset_index": i}, with_indices=True)' in message


def test_a_batch_of_one_image_has_no_negatives():
    with pytest.raises(
        ValueError,
        match=r"a batch of 1 image leaves its anchor without negatives.*at least 2 images per batch"
        r".*per_device_train_batch_size.*dataloader_drop_last=True",
    ):
        ContrastiveCollator()([{"image": solid(RED), "dataset_index": 0}])
    with pytest.raises(ValueError, match="at least 2 images per batch"):
        ContrastiveCollator()([])


def test_a_repeated_dataset_index_in_a_batch_is_refused():
    rows = [{"image": solid(RED), "dataset_index": i} for i in (5, 2, 5, 2, 7)]
    with pytest.raises(ValueError, match=r"\[2, 5\] appear more than once.*its own negative"):
        ContrastiveCollator()(rows)


def test_a_corrupt_image_names_its_dataset_index():
    rows = [
        {"image": solid(RED), "dataset_index": 4},
        {"image": {"bytes": b"not an image", "path": None}, "dataset_index": 17},
    ]
    with pytest.raises(ValueError, match=r"Could not decode the image in row 17 of the training set .*Fix or remove"):
        ContrastiveCollator(augmentation=geometric_only())(rows)


def test_a_missing_image_names_its_dataset_index():
    rows = [{"image": solid(RED), "dataset_index": 0}, {"image": None, "dataset_index": 9}]
    with pytest.raises(ValueError, match=r"row 9 of the training set is missing \(None\)"):
        ContrastiveCollator()(rows)


# decode_image


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return encoded(solid(RED).resize((30, 10)), format="JPEG", exif=exif)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(solid((10, 20, 30)), (10, 20, 30), id="RGB"),
        pytest.param(solid(128, mode="L"), (128, 128, 128), id="L"),
        pytest.param(solid(1, mode="1"), (255, 255, 255), id="1"),
        pytest.param(solid(100 * 257, mode="I"), (100, 100, 100), id="I-16-bit"),
        pytest.param(solid(65535, mode="I;16"), (255, 255, 255), id="I;16"),
        pytest.param(solid(0.5, mode="F"), (128, 128, 128), id="F-unit"),
        pytest.param(solid(RED, mode="RGB").convert("P"), RED, id="P"),
        pytest.param(solid((10, 20, 30, 255), mode="RGBA"), (10, 20, 30), id="RGBA-opaque"),
        pytest.param(solid((10, 20, 30, 0), mode="RGBA"), (255, 255, 255), id="RGBA-transparent-on-white"),
        pytest.param(solid((100, 128), mode="LA"), (177, 177, 177), id="LA-half-on-white"),
        pytest.param(solid((0, 255, 0, 0), mode="CMYK"), (255, 0, 255), id="CMYK"),
        pytest.param(np.full((6, 5), 200, dtype=np.uint8), (200, 200, 200), id="numpy-HxW-uint8"),
        pytest.param(np.full((6, 5, 1), 7, dtype=np.uint8), (7, 7, 7), id="numpy-HxWx1"),
        pytest.param(np.full((6, 5, 3), 0.5, dtype=np.float32), (128, 128, 128), id="numpy-float-unit"),
        pytest.param(np.full((6, 5, 3), 200.0), (200, 200, 200), id="numpy-float-0-255"),
        pytest.param(np.full((6, 5, 4), 255, dtype=np.uint8), (255, 255, 255), id="numpy-RGBA"),
        pytest.param(np.ones((6, 5), dtype=bool), (255, 255, 255), id="numpy-bool"),
        pytest.param(np.full((6, 5), 65535, dtype=np.uint16), (255, 255, 255), id="numpy-uint16"),
        pytest.param(torch.full((3, 6, 5), 1.0), (255, 255, 255), id="tensor-CHW"),
        pytest.param(torch.full((6, 5, 3), 64, dtype=torch.uint8), (64, 64, 64), id="tensor-HWC"),
        pytest.param({"bytes": encoded(solid((1, 2, 3))), "path": None}, (1, 2, 3), id="datasets-dict-bytes"),
        pytest.param(encoded(solid(7, mode="L")), (7, 7, 7), id="bytes-L-png"),
    ],
)
def test_every_supported_input_decodes_to_rgb(value, expected):
    image = decode_image(value, row=0)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == expected


def test_paths_and_path_dicts_decode(tmp_path):
    path = tmp_path / "image.png"
    solid((4, 5, 6), mode="RGBA").save(path)
    for value in (str(path), path, {"bytes": None, "path": str(path)}):
        image = decode_image(value)
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (4, 5, 6)
    with pytest.raises(ValueError, match=r"row 3 of the dataset .*FileNotFoundError"):
        decode_image(str(tmp_path / "absent.png"), row=3)


def test_exif_orientation_is_applied_like_datasets_does():
    assert decode_image(_exif_rotated_jpeg()).size == (10, 30)


@pytest.mark.parametrize(
    "value",
    [
        b"not an image",
        encoded(solid(RED))[:40],  # truncated PNG
        {"bytes": None, "path": None},
        np.zeros((2, 3, 4, 5), dtype=np.uint8),
        12345,
    ],
    ids=["garbage-bytes", "truncated-png", "empty-dict", "4d-array", "int"],
)
def test_undecodable_values_raise_a_value_error_naming_the_row(value):
    with pytest.raises(
        ValueError, match=r"Could not decode the image in row 17 of the dataset \(.+\)\. Fix or remove"
    ):
        decode_image(value, row=17)


def test_a_missing_image_is_a_clear_error():
    with pytest.raises(ValueError, match=r"row 3 of the dataset is missing \(None\)"):
        decode_image(None, row=3)
    with pytest.raises(ValueError, match=r"the input is missing \(None\)"):
        decode_image(None)


# datasets integration


def test_undecoded_datasets_images_work_in_the_collator():
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict(
        {
            "image": [
                {"bytes": encoded(solid(RED)), "path": None},
                {"bytes": encoded(solid(9, mode="L")), "path": None},
            ],
            "label": [0, 1],
        },
        features=features,
    )
    dataset = dataset.map(lambda _, i: {"dataset_index": i}, with_indices=True)  # the fix the error message gives
    rows = [dataset[0], dataset[1]]
    assert isinstance(rows[0]["image"], dict) and isinstance(rows[0]["image"]["bytes"], bytes)
    augmentation = geometric_only()
    batch = ContrastiveCollator(augmentation=augmentation)(rows)
    assert batch["dataset_index"].tolist() == [0, 1]
    assert torch.allclose(batch["pixel_values"][2].mean(dim=(1, 2)), normalised(RED, augmentation), atol=1e-4)


def test_with_dataset_index_leaves_images_undecoded_for_the_collator():
    dataset = datasets.Dataset.from_dict(
        {"image": [solid((9, 9, 9)), solid(3, mode="L")]}, features=datasets.Features({"image": datasets.Image()})
    )
    prepared = with_dataset_index(dataset, "image", "dataset_index")
    assert isinstance(prepared[0]["image"], dict)
    batch = ContrastiveCollator(augmentation=geometric_only())([prepared[0], prepared[1]])
    assert batch["dataset_index"].tolist() == [0, 1]


def test_dataset_index_column_is_added_and_checked():
    dataset = datasets.Dataset.from_dict({"image": [solid(1), solid(2), solid(3)]})
    prepared = with_dataset_index(dataset, "image", "dataset_index")
    assert prepared["dataset_index"] == [0, 1, 2]
    with pytest.raises(ValueError, match="must hold each row's position"):
        with_dataset_index(prepared.select([2, 0, 1]), "image", "dataset_index")
    with pytest.raises(ValueError, match="at least 2 images"):
        with_dataset_index(dataset.select([0]), "image", "dataset_index")


# SimCLRAugmentation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, r"image_size=0 .*positive integer"),
        ({"crop_scale": (0.9, 0.2)}, r"crop_scale=\(0\.9, 0\.2\) .*0 < low <= high <= 1"),
        ({"crop_scale": (0.0, 1.0)}, r"crop_scale=\(0\.0, 1\.0\)"),
        ({"horizontal_flip_probability": -0.1}, r"horizontal_flip_probability=-0\.1 .*\[0, 1\]"),
        ({"color_jitter_probability": 2.0}, r"color_jitter_probability=2\.0 .*\[0, 1\]"),
        ({"grayscale_probability": 1.5}, r"grayscale_probability=1\.5 .*\[0, 1\]"),
        ({"blur_probability": float("nan")}, r"blur_probability=nan .*\[0, 1\]"),
        ({"brightness": -1.0}, r"brightness=-1\.0 .*>= 0"),
        ({"hue": 0.7}, r"hue=0\.7 .*\[0, 0\.5\]"),
        ({"blur_sigma": (0.0, 1.0)}, r"blur_sigma=\(0\.0, 1\.0\) .*0 < low <= high"),
        ({"blur_sigma": (2.0, 1.0)}, r"blur_sigma=\(2\.0, 1\.0\)"),
        ({"std": (0.2, 0.0, 0.2)}, r"std=.*3 positive values"),
        ({"mean": (0.5, 0.5)}, r"mean=.*3 values"),
    ],
)
def test_bad_augmentation_parameters_name_the_field_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimCLRAugmentation(**kwargs)


@pytest.mark.parametrize(("image_size", "kernel"), [(8, 3), (32, 3), (64, 7), (96, 9), (224, 23)])
def test_blur_kernel_is_about_ten_percent_odd_and_at_least_three(image_size, kernel):
    assert SimCLRAugmentation(image_size=image_size).blur_kernel_size == kernel


def test_train_transform_is_random_sized_and_normalised():
    torch.manual_seed(0)
    augmentation = SimCLRAugmentation(image_size=24)
    first, second = augmentation.train_transform(gradient()), augmentation.train_transform(gradient())
    assert first.shape == (3, 24, 24) and first.dtype == torch.float32
    assert not torch.equal(first, second)
    assert first.min() < 0  # normalised, not in [0, 1]


def test_eval_transform_resizes_the_shorter_side_then_centre_crops_deterministically():
    augmentation = SimCLRAugmentation(image_size=10)
    stripes = np.zeros((20, 60, 3), dtype=np.uint8)  # H=20, W=60: red | green | blue thirds
    stripes[:, :20], stripes[:, 20:40], stripes[:, 40:] = RED, GREEN, BLUE
    image = Image.fromarray(stripes)
    first, second = augmentation.eval_transform(image), augmentation.eval_transform(image)
    assert first.shape == (3, 10, 10) and torch.equal(first, second)
    # 20×60 → 10×30, whose centre 10×10 crop is the green third (its edge columns blend in red and blue).
    assert torch.allclose(first[:, :, 2:8].mean(dim=(1, 2)), normalised(GREEN, augmentation), atol=1e-4)


def test_assigning_a_field_rebuilds_the_cached_transforms():
    augmentation = SimCLRAugmentation(image_size=16)
    assert augmentation.train_transform(solid(RED)).shape == (3, 16, 16)
    augmentation.image_size = 8
    assert augmentation.train_transform(solid(RED)).shape == (3, 8, 8)
    assert augmentation.eval_transform(solid(RED)).shape == (3, 8, 8)


def test_augmentation_pickles_without_its_cached_transforms():
    augmentation = geometric_only()
    augmentation.train_transform(solid(RED))
    assert "train_pipeline" in vars(augmentation)
    restored = pickle.loads(pickle.dumps(augmentation))
    assert restored == augmentation and "train_pipeline" not in vars(restored)
    assert restored.train_transform(solid(RED)).shape == (3, 16, 16)


def test_collator_pickles_and_runs_in_dataloader_workers():
    augmentation = geometric_only()
    collator = ContrastiveCollator(augmentation=augmentation)
    collator(  # build the cached transforms before the DataLoader pickles the collator
        [{"image": solid(RED), "dataset_index": 0}, {"image": solid(BLUE), "dataset_index": 1}]
    )
    assert pickle.loads(pickle.dumps(collator)) == collator
    colours = [(i * 30, 0, 255 - i * 30) for i in range(8)]
    rows = [{"image": {"bytes": encoded(solid(c)), "path": None}, "dataset_index": i} for i, c in enumerate(colours)]
    loader = torch.utils.data.DataLoader(rows, batch_size=4, num_workers=2, collate_fn=collator)
    batches = list(loader)
    assert [b["dataset_index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(b["pixel_values"].shape == (8, 3, 16, 16) for b in batches)
    last = batches[1]["pixel_values"].mean(dim=(2, 3))
    assert torch.allclose(last[3], normalised(colours[7], augmentation), atol=1e-4)
    assert torch.allclose(last[7], normalised(colours[7], augmentation), atol=1e-4)


# load_digits_dataset


def test_digits_dataset_schema_and_sizes(digits):
    assert set(digits) == {"train", "test"}
    assert len(digits["train"]) == 1257 and len(digits["test"]) == 540
    for split in digits.values():
        assert isinstance(split.features["image"], datasets.Image)
        assert isinstance(split.features["label"], datasets.ClassLabel)
        assert split.features["label"].names == [str(d) for d in range(10)]
    image = digits["train"][0]["image"]
    assert isinstance(image, Image.Image) and image.size == (16, 16) and image.mode == "L"
    assert max(np.asarray(digits["train"][i]["image"]).max() for i in range(20)) == 255  # 16 → 255


def test_digits_split_is_stratified_and_covers_every_digit_once(digits):
    overall = np.bincount(load_digits().target, minlength=10)
    train = np.bincount(digits["train"]["label"], minlength=10)
    test = np.bincount(digits["test"]["label"], minlength=10)
    assert np.array_equal(train + test, overall)
    assert np.all(np.abs(test - 0.3 * overall) <= 1)


def test_digits_split_depends_on_seed_and_test_size(digits):
    same = load_digits_dataset(image_size=16, seed=0)
    assert same["test"]["label"] == digits["test"]["label"]
    assert np.array_equal(np.asarray(same["test"][0]["image"]), np.asarray(digits["test"][0]["image"]))
    assert load_digits_dataset(image_size=16, seed=1)["test"]["label"] != digits["test"]["label"]
    smaller = load_digits_dataset(image_size=8, test_size=0.1)
    assert len(smaller["test"]) == 180 and smaller["train"][0]["image"].size == (8, 8)


def test_keyed_views_depend_only_on_seed_epoch_index_and_view():
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(3)]
    rows = [{"image": image, "dataset_index": 10 + i} for i, image in enumerate(images)]
    keyed = ContrastiveCollator(augmentation=SimCLRAugmentation(image_size=16), seed=7)
    batch = keyed(rows)["pixel_values"]
    torch.rand(5)  # global RNG use in between changes nothing
    again = keyed(list(reversed(rows)))["pixel_values"]  # another batch composition / order
    assert torch.equal(batch[0], again[2]) and torch.equal(batch[3], again[5])
    assert not torch.equal(batch[0], batch[3])  # the two views differ
    keyed.epoch = 1
    assert not torch.equal(keyed(rows)["pixel_values"][0], batch[0])  # a new epoch, new views
