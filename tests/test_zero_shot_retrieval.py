"""Zero-shot accuracy and image↔text recall match their definitions, and the evaluators run a real dual encoder."""

import math

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertModel, BertTokenizerFast

from emc2_hf import ContrastiveEncoder, ContrastiveEncoderConfig
from emc2_hf.data.images import UndecodableImageError
from emc2_hf.evaluation.retrieval import RetrievalEvaluator, combine_evaluators, retrieval_recall
from emc2_hf.evaluation.zero_shot import ZeroShotEvaluator, zero_shot_accuracy, zero_shot_classifier
from emc2_hf.modeling import build_dual_encoder, timm_image_tower

VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "digit", "zero", "one"]
RECALL_KEYS = {f"{direction}_recall@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)}


# --- an independent reference: plain Python loops over the definitions ---------------------------------------------


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _top(query: list[float], candidates: list[list[float]], k: int) -> list[int]:
    """The k candidates ranked first: highest cosine, equal cosines by smaller index."""
    return sorted(range(len(candidates)), key=lambda j: (-_cosine(query, candidates[j]), j))[:k]


def reference_recall(images: torch.Tensor, texts: torch.Tensor, text_image: list[int], ks) -> dict[str, float]:
    images, texts = images.tolist(), texts.tolist()
    metrics = {}
    for k in ks:
        image_hits = [any(text_image[j] == i for j in _top(image, texts, k)) for i, image in enumerate(images)]
        text_hits = [text_image[j] in _top(text, images, k) for j, text in enumerate(texts)]
        metrics[f"image_to_text_recall@{k}"] = sum(image_hits) / len(images)
        metrics[f"text_to_image_recall@{k}"] = sum(text_hits) / len(texts)
    return metrics


def random_retrieval_case(
    seed: int, num_images: int = 7, dim: int = 5
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Random embeddings, 1–3 captions per image, captions shuffled so an image's captions are not adjacent."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (num_images,), generator=generator).tolist()
    text_image = [image for image, count in enumerate(counts) for _ in range(count)]
    text_image = [text_image[j] for j in torch.randperm(len(text_image), generator=generator).tolist()]
    images = torch.randn(num_images, dim, generator=generator, dtype=torch.float64)
    texts = torch.randn(len(text_image), dim, generator=generator, dtype=torch.float64)
    return images, texts, text_image


# --- retrieval_recall ----------------------------------------------------------------------------------------------


def test_recall_equals_a_brute_force_reference_for_every_k():
    for seed in range(5):
        images, texts, text_image = random_retrieval_case(seed)
        ks = (1, 2, 3, 5, 10, 30)
        assert retrieval_recall(images, texts, text_image, ks) == pytest.approx(
            reference_recall(images, texts, text_image, ks), abs=1e-12
        )


def test_planted_orthogonal_embeddings_under_a_permutation_are_all_found():
    permutation = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    images = torch.eye(6)
    texts = torch.eye(6)[permutation] * 3.0  # caption j describes image permutation[j]
    assert set(retrieval_recall(images, texts, permutation).values()) == {1.0}
    # The same captions attributed to the wrong images (a derangement): nothing is found at 1.
    wrong = permutation.roll(1)
    metrics = retrieval_recall(images, texts, wrong, ks=(1,))
    assert metrics == {"image_to_text_recall@1": 0.0, "text_to_image_recall@1": 0.0}


def test_an_image_is_found_when_only_its_second_caption_is_nearest():
    e = torch.eye(3)
    images = e  # images 0, 1, 2
    # Image 0 has captions 0 and 1; caption 0 looks like image 1, caption 1 is exactly image 0.
    texts = torch.stack([e[1], e[0], e[1] + 0.1 * e[2], e[2]])
    text_image = [0, 0, 1, 2]
    metrics = retrieval_recall(images, texts, text_image, ks=(1, 2))
    # image→text: image 0 ranks caption 1 first (hit); image 1 ranks caption 0 (image 0's) first, its own second;
    # image 2 ranks caption 3 first.
    assert metrics["image_to_text_recall@1"] == pytest.approx(2 / 3)
    assert metrics["image_to_text_recall@2"] == 1.0
    # text→image: caption 0 ranks image 1 first, then images 0 and 2 tie at cosine 0 (0 comes first by index).
    assert metrics["text_to_image_recall@1"] == pytest.approx(3 / 4)
    assert metrics["text_to_image_recall@2"] == 1.0


def test_ties_go_to_the_smaller_index():
    # Every similarity ties: a query's candidates rank in index order, so the positive at index j has rank j.
    images, texts = torch.ones(4, 2), torch.ones(4, 2)
    metrics = retrieval_recall(images, texts, [0, 1, 2, 3], ks=(1, 2, 3, 4))
    for k in (1, 2, 3, 4):
        assert metrics[f"image_to_text_recall@{k}"] == k / 4
        assert metrics[f"text_to_image_recall@{k}"] == k / 4
    # Image 0's captions are texts 1 and 2, image 1's is text 0: image 0's best caption (1) has rank 1.
    metrics = retrieval_recall(torch.ones(2, 2), torch.ones(3, 2), [1, 0, 0], ks=(1, 2))
    assert metrics["image_to_text_recall@1"] == 0.5 and metrics["image_to_text_recall@2"] == 1.0
    # Zero embeddings (cosine 0 to everything) follow the same rule instead of failing.
    assert retrieval_recall(torch.zeros(2, 3), torch.zeros(2, 3), [0, 1], ks=(1,))["text_to_image_recall@1"] == 0.5


def test_recall_is_monotone_in_k_and_one_once_k_covers_every_candidate():
    images, texts, text_image = random_retrieval_case(seed=11, num_images=9)
    ks = tuple(range(1, len(texts) + 3))
    metrics = retrieval_recall(images, texts, text_image, ks)
    for direction, candidates in (("image_to_text", len(texts)), ("text_to_image", len(images))):
        values = [metrics[f"{direction}_recall@{k}"] for k in ks]
        assert values == sorted(values)
        assert all(0.0 <= value <= 1.0 for value in values)
        assert all(metrics[f"{direction}_recall@{k}"] == 1.0 for k in ks if k >= candidates)


def test_chunking_does_not_change_recall():
    images, texts, text_image = random_retrieval_case(seed=3, num_images=13)
    whole = retrieval_recall(images, texts, text_image, chunk_size=10_000)
    for chunk_size in (1, 2, 5):
        assert retrieval_recall(images, texts, text_image, chunk_size=chunk_size) == whole


def test_recall_ignores_the_scale_of_embeddings_and_ranks_half_precision_in_float32():
    images, texts, text_image = random_retrieval_case(seed=5)
    ks = (1, 2, 3)
    scales = 2.0 ** torch.randint(-4, 5, (len(images), 1), generator=torch.Generator().manual_seed(0))
    assert retrieval_recall(images * scales, texts, text_image, ks) == retrieval_recall(images, texts, text_image, ks)
    for dtype in (torch.bfloat16, torch.float16):
        low_images, low_texts = images.to(dtype), texts.to(dtype)
        assert retrieval_recall(low_images, low_texts, text_image, ks) == retrieval_recall(
            low_images.float(), low_texts.float(), text_image, ks
        )


def test_recall_rejects_uncaptioned_images_and_mismatched_shapes():
    with pytest.raises(ValueError, match=r"images \[1\] have no caption"):
        retrieval_recall(torch.eye(3), torch.eye(3)[:2], [0, 2])
    with pytest.raises(ValueError, match="same width"):
        retrieval_recall(torch.eye(3), torch.ones(3, 2), [0, 1, 2])
    with pytest.raises(ValueError, match="text_image"):
        retrieval_recall(torch.eye(3), torch.eye(3), [0, 1, 3])


# --- zero-shot classification --------------------------------------------------------------------------------------


def test_prompt_ensembling_averages_the_normalised_template_embeddings():
    class_text_embeddings = torch.tensor(
        [
            [[3.0, 0.0], [0.0, 4.0], [0.0, 4.0]],  # normalised: e0, e1, e1 → mean (1/3, 2/3) → (1, 2)/√5
            [[0.0, -1.0], [0.0, -5.0], [2.0, 0.0]],  # normalised: -e1, -e1, e0 → mean (1/3, -2/3) → (1, -2)/√5
        ]
    )
    expected = torch.tensor([[1.0, 2.0], [1.0, -2.0]]) / math.sqrt(5.0)
    torch.testing.assert_close(zero_shot_classifier(class_text_embeddings), expected)
    # Averaging before normalising would weight the long (4, 0) vectors more: the ensemble is not that.
    assert not torch.allclose(
        zero_shot_classifier(class_text_embeddings),
        torch.nn.functional.normalize(class_text_embeddings.mean(dim=1), dim=-1),
    )


def test_zero_shot_accuracy_of_planted_class_embeddings():
    classifier = torch.eye(4) * 2.0
    labels = torch.tensor([0, 1, 2, 3, 2, 1, 0, 3])
    generator = torch.Generator().manual_seed(0)
    images = torch.eye(4)[labels] + 0.01 * torch.randn(8, 4, generator=generator)
    assert zero_shot_accuracy(images, classifier, labels) == {"zero_shot_top1": 1.0, "zero_shot_top5": 1.0}
    # Each image lies nearest class c, but is labelled c + 1: its label is always its second-best class.
    nearest = torch.arange(8) % 4
    images = torch.eye(4)[nearest] + 0.5 * torch.eye(4)[(nearest + 1) % 4]
    metrics = zero_shot_accuracy(images, classifier, (nearest + 1) % 4, top_k=(1, 2, 3))
    assert metrics == {"zero_shot_top1": 0.0, "zero_shot_top2": 1.0, "zero_shot_top3": 1.0}


def test_zero_shot_top_k_is_clipped_to_the_number_of_classes_and_ties_go_to_the_smaller_class():
    # Three identical classes: every image is classified as class 0, then 1, then 2.
    metrics = zero_shot_accuracy(torch.randn(3, 2), torch.ones(3, 2), [0, 1, 2], top_k=(1, 2, 5))
    assert metrics == {
        "zero_shot_top1": pytest.approx(1 / 3),
        "zero_shot_top2": pytest.approx(2 / 3),
        "zero_shot_top5": 1.0,
    }


def test_zero_shot_top1_is_the_argmax_of_cosine_similarity_and_chunking_does_not_change_it():
    generator = torch.Generator().manual_seed(2)
    images, classifier = torch.randn(40, 6, generator=generator), torch.randn(5, 6, generator=generator)
    labels = torch.randint(0, 5, (40,), generator=generator)
    predicted = [
        max(range(5), key=lambda k, image=image: _cosine(image.tolist(), classifier[k].tolist())) for image in images
    ]
    expected = sum(p == y for p, y in zip(predicted, labels.tolist(), strict=True)) / 40
    metrics = zero_shot_accuracy(images, classifier, labels)
    assert metrics["zero_shot_top1"] == pytest.approx(expected)
    assert zero_shot_accuracy(images, classifier, labels, chunk_size=3) == metrics


# --- the evaluators, end to end on a tiny dual encoder -------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BertTokenizerFast:
    vocabulary = tmp_path_factory.mktemp("tokenizer") / "vocab.txt"
    vocabulary.write_text("\n".join(VOCABULARY) + "\n")
    # transformers 5 reads the vocabulary from `vocab=` (a `vocab_file=` keyword is ignored: every word → [UNK]).
    text_tokenizer = BertTokenizerFast(vocab=str(vocabulary))
    assert text_tokenizer.unk_token_id not in text_tokenizer("a photo of a cat")["input_ids"]
    return text_tokenizer


@pytest.fixture(scope="module")
def dual_encoder():
    torch.manual_seed(0)
    encoder = ContrastiveEncoder(ContrastiveEncoderConfig(backbone="test_resnet", projection_dim=16))
    text_config = BertConfig(
        vocab_size=len(VOCABULARY), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    return build_dual_encoder(timm_image_tower(encoder, image_size=32), BertModel(text_config), projection_dim=16)


def solid_image(index: int) -> Image.Image:
    """A 32 × 32 image whose red value (20 · index) says which row it is, for the oracle to read back."""
    return Image.new("RGB", (32, 32), (20 * index, 90, 160))


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, H, W]


CAPTIONS = [["a cat", "a photo of a cat"], ["a dog"], ["digit zero", "zero", "a digit zero"], ["digit one"]]
CLASS_NAMES = ["cat", "dog", "one"]
LABELS = [0, 1, 2, 2, 0]


@pytest.fixture(scope="module")
def retrieval_set() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image": [solid_image(i) for i in range(len(CAPTIONS))], "captions": CAPTIONS})


@pytest.fixture(scope="module")
def classification_set() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image": [solid_image(i) for i in range(len(LABELS))], "label": LABELS})


def install_oracle(monkeypatch, model, tokenizer, image_embedding, text_embedding) -> None:
    """Replace the towers by planted embeddings: images by the row their colour encodes, texts by their words."""

    def image_features(pixel_values, **kwargs):
        rows = torch.round(pixel_values[:, 0, 0, 0] * 255.0 / 20.0).long().tolist()
        return torch.stack([image_embedding(row) for row in rows])

    def text_features(input_ids, attention_mask=None, **kwargs):
        return torch.stack(
            [text_embedding(text) for text in tokenizer.batch_decode(input_ids, skip_special_tokens=True)]
        )

    monkeypatch.setattr(model, "get_image_features", image_features)
    monkeypatch.setattr(model, "get_text_features", text_features)


def test_an_oracle_dual_encoder_has_perfect_recall_with_every_caption_counted(
    monkeypatch, dual_encoder, tokenizer, retrieval_set
):
    caption_image = {caption: row for row, captions in enumerate(CAPTIONS) for caption in captions}
    eye = torch.eye(len(CAPTIONS))
    install_oracle(
        monkeypatch, dual_encoder, tokenizer, lambda row: eye[row] * (row + 1), lambda text: eye[caption_image[text]]
    )
    evaluator = RetrievalEvaluator(retrieval_set, tokenizer, to_tensor, batch_size=3)
    assert evaluator(dual_encoder) == dict.fromkeys(RECALL_KEYS, 1.0)
    assert len(evaluator.captions) == 7  # every caption of every image is a query, not only the first


def test_an_oracle_dual_encoder_classifies_every_image(monkeypatch, dual_encoder, tokenizer, classification_set):
    eye = torch.eye(len(CLASS_NAMES))
    install_oracle(
        monkeypatch,
        dual_encoder,
        tokenizer,
        lambda row: eye[LABELS[row]],
        lambda text: sum(eye[k] for k, name in enumerate(CLASS_NAMES) if name in text.split()),
    )
    evaluator = ZeroShotEvaluator(
        classification_set, CLASS_NAMES, ["a photo of a {}", "{}"], tokenizer, to_tensor, batch_size=2
    )
    assert evaluator.prompts[:2] == ["a photo of a cat", "cat"]
    assert evaluator(dual_encoder) == {"zero_shot_top1": 1.0, "zero_shot_top5": 1.0}


def test_evaluators_run_a_real_dual_encoder_and_restore_its_mode(
    dual_encoder, tokenizer, retrieval_set, classification_set
):
    retrieval = RetrievalEvaluator(retrieval_set, tokenizer, to_tensor, batch_size=3)
    zero_shot = ZeroShotEvaluator(classification_set, CLASS_NAMES, ["a photo of a {}", "{}"], tokenizer, to_tensor)
    evaluator = combine_evaluators(zero_shot, retrieval)
    for training in (True, False):
        dual_encoder.train(training)
        metrics = evaluator(dual_encoder, device="cpu")
        assert all(module.training == training for module in dual_encoder.modules())
        assert set(metrics) == RECALL_KEYS | {"zero_shot_top1", "zero_shot_top5"}
        assert all(0.0 <= value <= 1.0 for value in metrics.values())
        # 10 candidates or more than there are: every query is found. 5 classes or more than the 3 there are: too.
        assert metrics["text_to_image_recall@5"] == metrics["text_to_image_recall@10"] == 1.0
        assert metrics["image_to_text_recall@10"] == 1.0 and metrics["zero_shot_top5"] == 1.0
    assert not any(parameter.grad is not None for parameter in dual_encoder.parameters())


def test_a_plain_string_caption_and_rows_as_dicts_are_accepted(monkeypatch, dual_encoder, tokenizer):
    rows = [{"image": solid_image(0), "text": "a cat"}, {"image": solid_image(1), "text": ["a dog", "dog"]}]
    eye = torch.eye(2)
    install_oracle(monkeypatch, dual_encoder, tokenizer, lambda row: eye[row], lambda text: eye[int("dog" in text)])
    evaluator = RetrievalEvaluator(rows, tokenizer, to_tensor, caption_column="text")
    assert evaluator.captions == ["a cat", "a dog", "dog"] and evaluator.text_image == [0, 1, 1]
    assert evaluator(dual_encoder) == dict.fromkeys(RECALL_KEYS, 1.0)


def test_combined_evaluators_refuse_two_metrics_of_the_same_name(dual_encoder):
    evaluator = combine_evaluators(lambda model, device=None: {"a": 0.5}, lambda model, device=None: {"a": 0.25})
    with pytest.raises(ValueError, match=r"two evaluators both return \['a'\]"):
        evaluator(dual_encoder)


# --- one-line errors that name the problem and the fix -------------------------------------------------------------


def one_line_error(function, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        function(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_missing_column_is_named_with_the_columns_present(tokenizer, retrieval_set, classification_set):
    message = one_line_error(RetrievalEvaluator, retrieval_set, tokenizer, to_tensor, caption_column="text")
    assert "no column 'text'" in message and "['image', 'captions']" in message and "caption_column" in message
    message = one_line_error(ZeroShotEvaluator, classification_set, CLASS_NAMES, ["{}"], tokenizer, to_tensor, "img")
    assert "no column 'img'" in message and "['image', 'label']" in message and "image_column" in message


def test_empty_captions_name_their_row(tokenizer):
    rows = [{"image": solid_image(0), "captions": ["a cat"]}, {"image": solid_image(1), "captions": []}]
    message = one_line_error(RetrievalEvaluator, rows, tokenizer, to_tensor)
    assert "row 1 of column 'captions' has no caption" in message
    rows[1]["captions"] = ["a dog", "  "]
    message = one_line_error(RetrievalEvaluator, rows, tokenizer, to_tensor)
    assert "caption 1 of row 1 of column 'captions'" in message and "non-empty string" in message
    rows[1]["captions"] = ""
    assert "caption 0 of row 1" in one_line_error(RetrievalEvaluator, rows, tokenizer, to_tensor)


def test_templates_need_a_slot_for_the_class_name_and_classes_need_names(tokenizer, classification_set):
    for templates in (["a photo of a cat"], ["a {} of a {}"], ["a photo of {name}"]):
        message = one_line_error(ZeroShotEvaluator, classification_set, CLASS_NAMES, templates, tokenizer, to_tensor)
        assert repr(templates[0]) in message and "needs exactly one '{}'" in message
    assert "non-empty list" in one_line_error(
        ZeroShotEvaluator, classification_set, CLASS_NAMES, [], tokenizer, to_tensor
    )
    assert "non-empty list" in one_line_error(ZeroShotEvaluator, classification_set, [], ["{}"], tokenizer, to_tensor)
    message = one_line_error(ZeroShotEvaluator, classification_set, ["cat", ""], ["{}"], tokenizer, to_tensor)
    assert "class name 1 is ''" in message
    # Label 2 of rows 2 and 3 has no class name when only two are given.
    message = one_line_error(ZeroShotEvaluator, classification_set, ["cat", "dog"], ["{}"], tokenizer, to_tensor)
    assert "row 2 of column 'label' has label 2" in message and "[0, 2)" in message


def test_an_undecodable_image_names_its_row(dual_encoder, tokenizer):
    rows = [{"image": solid_image(0), "captions": "a cat"}, {"image": None, "captions": "a dog"}]
    dual_encoder.train()
    with pytest.raises(UndecodableImageError, match="row 1 of the retrieval set"):
        RetrievalEvaluator(rows, tokenizer, to_tensor)(dual_encoder)
    assert dual_encoder.training  # the train mode is restored on failure too


def test_identical_captions_count_as_one_text_when_asked():
    """Images 0 and 1 both carry the caption "a" (rows 0 and 2 of the texts, identical embeddings); images 2, 3 carry
    "c". Under the standard protocol the tie between identical captions goes to the smaller index, so image 1 and
    image 3 miss at 1; with text groups every image with the right text hits."""
    a, b, c = torch.eye(3)
    texts = torch.stack([a, b, a, c, c])  # captions: img0 "a", img0 "b", img1 "a", img2 "c", img3 "c"
    text_image = [0, 0, 1, 2, 3]
    images = torch.stack([a, a, c, c])
    standard = retrieval_recall(images, texts, text_image, ks=(1,))
    assert standard["image_to_text_recall@1"] == 0.5  # images 1 and 3 lose the tie to an identical caption
    assert standard["text_to_image_recall@1"] == pytest.approx(3 / 5)  # captions 2 and 4 lose the tie too
    grouped = retrieval_recall(images, texts, text_image, ks=(1,), text_groups=[0, 1, 0, 2, 2])
    assert grouped == {"image_to_text_recall@1": 1.0, "text_to_image_recall@1": 1.0}
