"""Image–caption data: loaders read each Hub schema (generated here, in that schema) and the collator's batches are
reproducible, keyed and carry exactly the EMC² chain states the batch lacks."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizerFast, CLIPImageProcessor

from emc2_hf.data.image_text import (
    DIGIT_CLASS_NAMES,
    ImageTextDataError,
    drop_bad_image_text_rows,
    find_bad_image_text_rows,
    load_coco_karpathy,
    load_digits_captions,
    load_flickr30k,
    load_image_text_split,
)
from emc2_hf.data.image_text_collator import ImageTextCollator, ImageTextTransforms
from emc2_hf.data.sources import DatasetUnavailableError
from emc2_hf.objectives.problem import NO_STATE
from emc2_hf.sampling.random import keyed_seed
from emc2_hf.sampling.sample_state import ChainStateTable, MarkovChainState

# ------------------------------------------------------------------------------------------------ data generation


def _picture(k: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    rng = np.random.default_rng(k)
    base = np.array([(k * 53) % 256, (k * 97) % 256, 128], dtype=np.float32)
    pixels = base + rng.normal(0, 30, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


FLICKR_SPLITS = ["train", "val", "train", "test", "train", "val", "train", "train"]


def _flickr_rows() -> dict[str, list]:
    return {
        "image": [{"bytes": _encoded(_picture(k), "JPEG"), "path": f"{1000 + k}.jpg"} for k in range(8)],
        "caption": [[f"picture {k} caption {c}" for c in range(5)] for k in range(8)],
        "sentids": [[str(5 * k + c) for c in range(5)] for k in range(8)],
        "split": FLICKR_SPLITS,
        "img_id": [str(k) for k in range(8)],
        "filename": [f"{1000 + k}.jpg" for k in range(8)],
    }


FLICKR_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "caption": datasets.List(datasets.Value("string")),
        "sentids": datasets.List(datasets.Value("string")),
        "split": datasets.Value("string"),
        "img_id": datasets.Value("string"),
        "filename": datasets.Value("string"),
    }
)


def make_flickr30k_hub(root: Path) -> Path:
    """``nlphuji/flickr30k``'s parquet conversion: one Hub split ``test`` holding every Karpathy split."""
    (root / "data").mkdir(parents=True)
    table = datasets.Dataset.from_dict(_flickr_rows(), features=FLICKR_FEATURES)
    table.to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def make_flickr30k_repository(root: Path) -> Path:
    """The ``nlphuji/flickr30k`` repository as ``hf download`` leaves it, with the image zip extracted."""
    import pandas as pd

    rows = _flickr_rows()
    (root / "flickr30k-images").mkdir(parents=True)
    for k, name in enumerate(rows["filename"]):
        _picture(k).save(root / "flickr30k-images" / name)
    columns = {
        "raw": [json.dumps(c) for c in rows["caption"]],
        "sentids": [json.dumps(s) for s in rows["sentids"]],
        "split": rows["split"],
        "filename": rows["filename"],
        "img_id": rows["img_id"],
    }
    pd.DataFrame(columns).to_csv(root / "flickr_annotations_30k.csv", index=False)
    return root


COCO_SPLITS = {"train": ["train", "restval", "train", "restval"], "validation": ["val", "val"], "test": ["test"] * 2}


def make_coco_karpathy(root: Path, image_root: Path) -> tuple[Path, list[Path]]:
    """``yerevann/coco-karpathy``: parquet per Hub split, no pixels; the images under ``image_root/<filepath>/``."""
    (root / "data").mkdir(parents=True)
    files, cocoid = [], 0
    for hub_split, karpathy in COCO_SPLITS.items():
        rows: dict[str, list] = {key: [] for key in ("filepath", "sentids", "filename", "imgid", "split")}
        rows.update(sentences=[], cocoid=[], url=[])
        for value in karpathy:
            filepath = "train2014" if value == "train" else "val2014"
            filename = f"COCO_{filepath}_{cocoid:012d}.jpg"
            (image_root / filepath).mkdir(parents=True, exist_ok=True)
            _picture(cocoid, (30, 22)).save(image_root / filepath / filename)
            files.append(image_root / filepath / filename)
            rows["filepath"].append(filepath)
            rows["filename"].append(filename)
            rows["sentids"].append([10 * cocoid + c for c in range(5)])
            rows["imgid"].append(cocoid)
            rows["split"].append(value)
            rows["sentences"].append([f"coco {cocoid} sentence {c}" for c in range(5)])
            rows["cocoid"].append(cocoid)
            rows["url"].append(f"http://images.cocodataset.org/{filepath}/{filename}")
            cocoid += 1
        datasets.Dataset.from_dict(rows).to_parquet(str(root / "data" / f"{hub_split}-00000-of-00001.parquet"))
    return root, files


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


# -------------------------------------------------------------------------------------------------------- loaders


def test_flickr30k_parquet_selects_the_karpathy_split_from_its_column(tmp_path, cache):
    root = make_flickr30k_hub(tmp_path / "flickr30k")
    train = load_image_text_split(str(root), "train", cache_dir=cache)
    assert len(train) == FLICKR_SPLITS.count("train")
    assert set(train["split"]) == {"train"}
    assert {"image", "captions", "sentids", "img_id", "filename"} <= set(train.column_names)
    assert "caption" not in train.column_names
    assert train["img_id"] == [str(k) for k, s in enumerate(FLICKR_SPLITS) if s == "train"]
    assert train[0]["captions"] == [f"picture 0 caption {c}" for c in range(5)]
    assert isinstance(train.features["image"], datasets.Image) and not train.features["image"].decode
    assert Image.open(io.BytesIO(train[1]["image"]["bytes"])).size == (24, 20)
    assert len(load_flickr30k("validation", str(root), cache_dir=cache)) == 2  # "validation" means Karpathy's "val"
    assert len(load_flickr30k("train+val+test", str(root), cache_dir=cache)) == 8


def test_flickr30k_save_to_disk_and_downloaded_repository(tmp_path, cache):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(_flickr_rows(), features=FLICKR_FEATURES)}).save_to_disk(
        str(saved)
    )
    assert load_image_text_split(str(saved), "test")["img_id"] == ["3"]
    repository = make_flickr30k_repository(tmp_path / "repository")
    val = load_image_text_split(str(repository), "val")
    assert val["img_id"] == ["1", "5"] and val[0]["captions"][4] == "picture 1 caption 4"
    assert val[0]["sentids"] == [str(5 + c) for c in range(5)]
    assert Path(val[0]["image"]["path"]) == repository / "flickr30k-images" / "1001.jpg"


def test_flickr30k_unknown_split_lists_the_split_values(tmp_path, cache):
    root = make_flickr30k_hub(tmp_path / "flickr30k")
    with pytest.raises(DatasetUnavailableError, match=r"no Karpathy split 'restval'.*\['test', 'train', 'val'\]"):
        load_flickr30k("restval", str(root), cache_dir=cache)


def test_flickr30k_from_the_hub_offline_says_how_to_use_a_local_copy(cache):
    with pytest.raises(DatasetUnavailableError) as raised:
        load_image_text_split("nlphuji/flickr30k", "train", cache_dir=cache)
    assert "hf download nlphuji/flickr30k --repo-type dataset" in str(raised.value)


def test_coco_karpathy_joins_file_paths_to_the_image_root(tmp_path, cache):
    root, _ = make_coco_karpathy(tmp_path / "coco-karpathy", tmp_path / "coco")
    train = load_image_text_split(str(root), "train+restval", image_root=str(tmp_path / "coco"), cache_dir=cache)
    assert train["cocoid"] == [0, 1, 2, 3] and sorted(set(train["split"])) == ["restval", "train"]
    assert train[1]["captions"] == [f"coco 1 sentence {c}" for c in range(5)]
    first = train[0]["image"]
    assert (
        first["bytes"] is None
        and Path(first["path"]) == tmp_path / "coco" / "train2014" / "COCO_train2014_000000000000.jpg"
    )
    assert Image.open(train[1]["image"]["path"]).size == (30, 22)
    test = load_coco_karpathy("test", str(tmp_path / "coco"), str(root), cache_dir=cache)
    assert test["cocoid"] == [6, 7] and {"url", "sentids", "imgid", "filepath"} <= set(test.column_names)


def test_coco_karpathy_without_or_with_a_wrong_image_root(tmp_path, cache):
    root, _ = make_coco_karpathy(tmp_path / "coco-karpathy", tmp_path / "coco")
    with pytest.raises(DatasetUnavailableError, match="holds no pixels.*pass image_root=DIR.*train2014/ and val2014/"):
        load_coco_karpathy("test", None, str(root), cache_dir=cache)
    with pytest.raises(DatasetUnavailableError, match=r"image_root='.*nowhere' is not a folder"):
        load_coco_karpathy("test", str(tmp_path / "nowhere"), str(root), cache_dir=cache)


def test_coco_karpathy_missing_image_file_names_row_and_file(tmp_path, cache):
    root, files = make_coco_karpathy(tmp_path / "coco-karpathy", tmp_path / "coco")
    files[7].unlink()
    with pytest.raises(ImageTextDataError) as raised:
        load_coco_karpathy("test", str(tmp_path / "coco"), str(root), cache_dir=cache)
    message = str(raised.value)
    assert "\n" not in message
    assert f"row 1 of split 'test' of '{root}' (file {files[7]}) has no image: the file does not exist" in message
    assert "image_root=" in message and "drop_bad_rows=True" in message
    kept = load_coco_karpathy("test", str(tmp_path / "coco"), str(root), drop_bad_rows=True, cache_dir=cache)
    assert kept["cocoid"] == [6]


def _captioned_folder(folder: Path, captions: list) -> None:
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for k, caption in enumerate(captions):
            _picture(k).save(folder / f"{k}.png")
            metadata.write(json.dumps({"file_name": f"{k}.png", "caption": caption, "label": k}) + "\n")


def test_imagefolder_with_metadata_jsonl(tmp_path, cache):
    lists = [[f"image {k}", f"another view of {k}"][: 1 + k % 2] for k in range(4)]  # a list of captions per image
    _captioned_folder(tmp_path / "captioned" / "train", lists)
    _captioned_folder(tmp_path / "captioned" / "test", [["test image 0"], ["test image 1"]])
    train = load_image_text_split(str(tmp_path / "captioned"), "train", cache_dir=cache)
    assert len(train) == 4 and {"image", "captions", "label"} <= set(train.column_names)
    assert {row["label"]: row["captions"] for row in train} == dict(enumerate(lists))
    assert len(load_image_text_split(str(tmp_path / "captioned"), "test", cache_dir=cache)) == 2
    _captioned_folder(tmp_path / "flat", ["zero", "one", "two"])  # one caption string per image, no split folders
    flat = load_image_text_split(str(tmp_path / "flat"), "train", cache_dir=cache)
    assert sorted(flat["captions"]) == [["one"], ["two"], ["zero"]]


def test_parquet_with_named_image_and_caption_columns(tmp_path, cache):
    path = tmp_path / "pairs.parquet"
    features = datasets.Features(
        {"img": datasets.Image(), "text": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    rows = {"img": [_encoded(_picture(k)) for k in range(3)], "text": ["one", "two", "three"], "label": [1, 2, 3]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    pairs = load_image_text_split(str(path), "train", image_column="img", caption_column="text", cache_dir=cache)
    assert set(pairs.column_names) == {"image", "label", "captions"}
    assert pairs["captions"] == [["one"], ["two"], ["three"]] and pairs["label"] == [1, 2, 3]
    with pytest.raises(
        DatasetUnavailableError, match=r"no column 'caption'; its columns are \['img', 'text', 'label'\]"
    ):
        load_image_text_split(str(path), "train", caption_column="caption", cache_dir=cache)


def _bad_rows(tmp_path) -> Path:
    path = tmp_path / "bad.parquet"
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))})
    images = [{"bytes": _encoded(_picture(k)), "path": f"/data/{k}.png"} for k in range(6)]
    images[5] = {"bytes": b"not an image", "path": "/data/5.png"}
    captions = [["fine"], [""], [], None, ["ok", "   "], ["decodes badly"]]
    datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features).to_parquet(str(path))
    return path


def test_bad_captions_raise_naming_row_file_and_fix(tmp_path, cache):
    with pytest.raises(ImageTextDataError) as raised:
        load_image_text_split(str(_bad_rows(tmp_path)), "train", cache_dir=cache)
    message = str(raised.value)
    assert "\n" not in message
    assert (
        message.startswith("row 1 of split 'train' of ")
        and "(file /data/1.png) has an empty caption (caption 0 is '')" in message
    )
    assert "(4 such rows)" in message and "drop_bad_image_text_rows(dataset)" in message


def test_bad_rows_are_found_and_dropped_with_a_count(tmp_path, cache, caplog):
    loaded = load_image_text_split(str(_bad_rows(tmp_path)), "train", drop_bad_rows=True, cache_dir=cache)
    assert loaded["captions"] == [["fine"], ["decodes badly"]]
    raw = datasets.load_dataset("parquet", data_files=str(_bad_rows(tmp_path)), split="train", cache_dir=cache)
    raw = raw.rename_column("caption", "captions")
    problems = dict(find_bad_image_text_rows(raw, check_images=True))
    assert sorted(problems) == [1, 2, 3, 4, 5]
    assert problems[2].endswith("has no caption (an empty list)") and problems[3].endswith("(missing: None)")
    assert problems[4].endswith("has an empty caption (caption 1 is '   ')")
    assert problems[5] == "row 5 of the dataset (file /data/5.png) has an image that does not decode"
    with caplog.at_level("WARNING"):
        cleaned, dropped = drop_bad_image_text_rows(raw, check_images=True)
    assert dropped == 5 and len(cleaned) == 1 and "dropped 5 of 6 image-text rows" in caplog.text


def test_digits_with_template_captions():
    digits = load_digits_captions(image_size=16)
    train, test = digits["train"], digits["test"]
    assert (len(train), len(test)) == (1257, 540)
    assert DIGIT_CLASS_NAMES[3] == "three" and len(DIGIT_CLASS_NAMES) == 10
    row = train[0]
    assert {"image", "label", "captions"} <= set(train.column_names) and len(row["captions"]) >= 3
    assert f"a photo of the digit {DIGIT_CLASS_NAMES[row['label']]}" in row["captions"]
    assert f"a handwritten {row['label']}" in row["captions"]
    assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (16, 16)
    assert load_image_text_split("digits", "test", image_size=16)["label"] == test["label"]


# ------------------------------------------------------------------------------------------------------- collator

NUM_ROWS = 12
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _captions(row: int) -> list[str]:
    """Row ``r`` has ``1 + r % 5`` captions; caption ``c`` says ``r`` and ``c``, and grows with ``c``."""
    return [f"a photo r{row} c{c}" + " very" * (3 * c) for c in range(1 + row % 5)]


@pytest.fixture
def tokenizer(tmp_path) -> BertTokenizerFast:
    words = ["a", "photo", "very"] + [f"r{r}" for r in range(NUM_ROWS)] + [f"c{c}" for c in range(5)]
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("\n".join(SPECIAL + words) + "\n")
    return BertTokenizerFast(vocab_file=str(vocabulary))


@pytest.fixture
def pairs() -> datasets.Dataset:
    features = datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "captions": datasets.List(datasets.Value("string")),
            "dataset_index": datasets.Value("int64"),
        }
    )
    rows = {
        "image": [{"bytes": _encoded(_picture(k)), "path": None} for k in range(NUM_ROWS)],
        "captions": [_captions(k) for k in range(NUM_ROWS)],
        "dataset_index": list(range(NUM_ROWS)),
    }
    return datasets.Dataset.from_dict(rows, features=features)


TRANSFORMS = ImageTextTransforms(image_size=16, crop_scale=(0.5, 1.0), horizontal_flip=True)


def _collator(tokenizer, **fields) -> ImageTextCollator:
    return ImageTextCollator(tokenizer, TRANSFORMS, **{"seed": 7, **fields})


def _tokens(batch: dict, prefix: str, row: int) -> list[int]:
    ids, mask = batch[f"{prefix}input_ids"][row], batch[f"{prefix}attention_mask"][row]
    return ids[mask.bool()].tolist()


def test_batch_shapes_and_keys(tokenizer, pairs):
    batch = _collator(tokenizer)([pairs[k] for k in (0, 4, 9)])
    assert set(batch) == {
        "pixel_values", "input_ids", "attention_mask", "token_type_ids", "dataset_index", "image_view_keys",
        "caption_index",
    }  # fmt: skip
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["dataset_index"].tolist() == [0, 4, 9]
    assert batch["image_view_keys"].tolist() == [keyed_seed(7, "image-augmentation", 0, k) for k in (0, 4, 9)]
    assert batch["caption_index"][0] == 0  # row 0 has one caption
    for position, row in enumerate((0, 4, 9)):
        caption = _captions(row)[int(batch["caption_index"][position])]
        assert _tokens(batch, "", position) == tokenizer(caption)["input_ids"]


def test_same_seed_epoch_index_gives_the_same_view_and_caption_whatever_the_batch(tokenizer, pairs):
    collator = _collator(tokenizer, epoch=3)
    first = collator([pairs[k] for k in (4, 9, 1, 2)])
    torch.manual_seed(123)  # the global RNG does not matter
    second = collator([pairs[k] for k in (9, 6, 4)])
    for a, b in ((0, 2), (1, 0)):
        assert torch.equal(first["pixel_values"][a], second["pixel_values"][b])
        assert first["caption_index"][a] == second["caption_index"][b]
        assert _tokens(first, "", a) == _tokens(second, "", b)
    assert not torch.equal(first["pixel_values"][0], collator([pairs[4], pairs[9]])["pixel_values"][1])
    collator.epoch = 4
    assert not torch.equal(first["pixel_values"][0], collator([pairs[4], pairs[9]])["pixel_values"][0])


def test_random_captions_change_across_epochs_and_first_is_always_zero(tokenizer, pairs):
    collator = _collator(tokenizer)
    choices = set()
    for epoch in range(8):
        collator.epoch = epoch
        batch = collator([pairs[4], pairs[3]])
        choices.add(int(batch["caption_index"][0]))
        assert batch["caption_index"][0] == collator.choose_caption(4, 5)
    assert len(choices) > 1
    first = _collator(tokenizer, caption_choice="first")
    for epoch in range(4):
        first.epoch = epoch
        batch = first([pairs[4], pairs[3], pairs[9]])
        assert batch["caption_index"].tolist() == [0, 0, 0]
        assert _tokens(batch, "", 0) == tokenizer(_captions(4)[0])["input_ids"]


def test_random_caption_frequency_is_uniform_over_epochs(tokenizer):
    collator = _collator(tokenizer)
    counts = Counter()
    for epoch in range(5000):
        collator.epoch = epoch
        counts[collator.choose_caption(4, 5)] += 1
    assert sorted(counts) == [0, 1, 2, 3, 4]
    assert all(880 < counts[c] < 1120 for c in range(5)), counts  # ± 4 standard deviations of 1000


def test_seedless_and_unaugmented_view_keys(tokenizer, pairs):
    seedless = ImageTextCollator(tokenizer, TRANSFORMS)
    assert seedless([pairs[0], pairs[1]])["image_view_keys"].tolist() == [NO_STATE, NO_STATE]
    fixed = ImageTextCollator(tokenizer, TRANSFORMS, augment=False)
    batch = fixed([pairs[0], pairs[1]])
    assert batch["image_view_keys"].tolist() == [0, 0]
    assert torch.equal(batch["pixel_values"], fixed.eval_pixel_values([pairs[0]["image"], pairs[1]["image"]]))


def _chain_tables(image_to_text: dict, text_to_image: dict) -> dict[str, ChainStateTable]:
    """One image→text chain per pair; one text→image chain per caption (here every caption's chain of a pair starts
    on the same state, so the test does not depend on which caption the epoch picks)."""
    tables = {}
    for direction, states, slots in (("image_to_text", image_to_text, 1), ("text_to_image", text_to_image, 5)):
        chains = MarkovChainState(NUM_ROWS, num_slots=slots)
        for anchor, (index, view) in states.items():
            chains.state_index[anchor, :], chains.state_view[anchor, :] = index, view
        tables[direction] = ChainStateTable(chains)
    return tables


def test_chain_states_are_delivered_recreated_and_only_when_missing(tokenizer, pairs):
    collator = _collator(tokenizer, epoch=2)
    batch_rows = (0, 1, 2, 3)
    in_batch = {k: collator.choose_caption(k, len(_captions(k))) for k in batch_rows}
    text_states = {0: (9, 4), 1: (2, in_batch[2]), 3: (9, 4), 5: (7, 1)}  # row 2's chain is empty
    image_states = {0: (8, 12345), 1: (3, collator.image_view_key(3)), 2: (6, 999), 3: (8, 12345)}
    collator.attach_chain_states(_chain_tables(text_states, image_states), pairs)
    batch = collator([pairs[k] for k in batch_rows])

    assert batch["text_start_index"].tolist() == [9, 2, NO_STATE, 9]
    assert batch["text_start_view"].tolist() == [4, in_batch[2], NO_STATE, 4]
    assert batch["state_text_index"].tolist() == [9] and batch["state_text_view"].tolist() == [4]
    assert _tokens(batch, "state_", 0) == tokenizer(_captions(9)[4])["input_ids"]
    assert batch["state_input_ids"].shape[1] == batch["input_ids"].shape[1]
    batch_lengths = [len(tokenizer(_captions(k)[in_batch[k]])["input_ids"]) for k in batch_rows]
    state_length = len(tokenizer(_captions(9)[4])["input_ids"])
    assert state_length > max(batch_lengths)  # so the batch captions are padded to the state caption's length:
    assert batch["input_ids"].shape[1] == state_length  # one tokenizer call for both
    assert {"state_attention_mask", "state_token_type_ids"} <= set(batch)

    assert batch["image_start_index"].tolist() == [8, 3, 6, 8]
    assert batch["state_image_index"].tolist() == [6, 8] and batch["state_image_view"].tolist() == [999, 12345]
    assert batch["state_pixel_values"].shape == (2, 3, 16, 16)
    for position, (index, key) in enumerate(((6, 999), (8, 12345))):
        torch.manual_seed(key)  # an independent re-render of the stored view
        expected = TRANSFORMS.train_transform(Image.open(io.BytesIO(pairs[index]["image"]["bytes"])))
        assert torch.equal(batch["state_pixel_values"][position], expected)


def test_one_direction_and_no_missing_states(tokenizer, pairs):
    collator = _collator(tokenizer)
    caption_of_1 = collator.choose_caption(1, len(_captions(1)))
    tables = _chain_tables({0: (1, caption_of_1)}, {})
    collator.attach_chain_states({"image_to_text": tables["image_to_text"]}, pairs)
    batch = collator([pairs[0], pairs[1]])
    assert batch["state_text_index"].numel() == 0 and batch["state_input_ids"].shape == (
        0,
        batch["input_ids"].shape[1],
    )
    assert "state_pixel_values" not in batch and "image_start_index" not in batch


def test_unaugmented_image_states_are_evaluation_views(tokenizer, pairs):
    collator = ImageTextCollator(tokenizer, TRANSFORMS, augment=False)  # no seed needed: views are fixed
    collator.attach_chain_states({"text_to_image": _chain_tables({}, {0: (5, 0)})["text_to_image"]}, pairs)
    batch = collator([pairs[0], pairs[1]])
    assert batch["state_image_index"].tolist() == [5]
    assert torch.equal(batch["state_pixel_values"][0], TRANSFORMS.eval_transform(pairs[5]["image"]))
    assert "state_input_ids" not in batch


def test_attaching_chain_tables_checks_slots_seed_and_directions(tokenizer, pairs):
    two_slots = ChainStateTable(MarkovChainState(NUM_ROWS, num_slots=2))
    with pytest.raises(ValueError, match="'image_to_text' chain table has 2 slots.*num_slots=1"):
        _collator(tokenizer).attach_chain_states({"image_to_text": two_slots}, pairs)
    one_slot = ChainStateTable(MarkovChainState(NUM_ROWS, num_slots=1))
    with pytest.raises(ValueError, match="text_to_image chain states are image views.*set seed"):
        ImageTextCollator(tokenizer, TRANSFORMS).attach_chain_states({"text_to_image": one_slot}, pairs)
    ImageTextCollator(tokenizer, TRANSFORMS).attach_chain_states({"image_to_text": one_slot}, pairs)  # captions: ok
    collator = _collator(tokenizer, caption_choice="random")
    collator.attach_chain_states({"text_to_image": one_slot}, pairs)  # one chain, but rows have several captions
    rows = [pairs[k] for k in range(NUM_ROWS) if len(_captions(k)) > 1]
    with pytest.raises(ValueError, match="no text→image chain.*captions_per_pair"):
        collator(rows)
    with pytest.raises(ValueError, match="unknown chain direction"):
        _collator(tokenizer).attach_chain_states({"image_to_image": one_slot}, pairs)


def _one_line_error(error_type, collator, rows) -> str:
    with pytest.raises(error_type) as raised:
        collator(rows)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_bad_batches_raise_one_line_errors(tokenizer, pairs):
    collator = _collator(tokenizer)
    assert "at least 2 pairs per batch" in _one_line_error(ValueError, collator, [pairs[0]])
    assert "index(es) [3] appear more than once" in _one_line_error(ValueError, collator, [pairs[3], pairs[3]])
    missing = {key: value for key, value in pairs[0].items() if key != "captions"}
    message = _one_line_error(KeyError, collator, [missing, pairs[1]])
    assert "no column 'captions' in the dataset rows; the columns are ['dataset_index', 'image']" in message
    empty = {**pairs[2], "captions": [], "image": {"bytes": pairs[2]["image"]["bytes"], "path": "/data/2.png"}}
    message = _one_line_error(ValueError, collator, [pairs[0], empty])
    assert message.startswith("ImageTextCollator: row 2 of the training set (file /data/2.png) has no caption")
    assert "drop_bad_image_text_rows(dataset)" in message
    broken = {**pairs[4], "image": {"bytes": b"nope", "path": "/data/4.png"}}
    message = _one_line_error(ValueError, collator, [pairs[0], broken])
    assert "row 4 of the training set (file /data/4.png)" in message and "check_images=True" in message


def test_transforms_from_a_clip_image_processor():
    processor = CLIPImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    transforms = ImageTextTransforms.from_image_processor(processor, crop_scale=(0.8, 1.0))
    assert (transforms.image_size, transforms.eval_resize, transforms.interpolation) == (32, 40, "bicubic")
    assert transforms.mean == (0.5, 0.5, 0.5) and transforms.std == (0.25, 0.25, 0.25)
    image = _picture(3, (50, 60))
    assert transforms.eval_transform(image).shape == (3, 32, 32) and transforms.train_transform(image).shape == (
        3,
        32,
        32,
    )
    assert torch.equal(transforms.eval_transform(image), transforms.eval_transform(image))
