"""A tiny dual encoder and tokenizer for the digits captions, shared by the dual-encoder tests and their workers."""

from __future__ import annotations

import os

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from emc2_hf import ContrastiveEncoder, ContrastiveEncoderConfig, build_dual_encoder, timm_image_tower
from emc2_hf.data.image_text import DIGIT_CAPTION_TEMPLATES, DIGIT_CLASS_NAMES

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def digits_vocabulary() -> list[str]:
    words = {word for template in DIGIT_CAPTION_TEMPLATES for word in template.replace("{", " ").split()}
    words = {w for w in words if not w.endswith("}")} | set(DIGIT_CLASS_NAMES) | {str(d) for d in range(10)}
    words |= {"photo", "of", "a", "the", "digit", "."}
    return SPECIAL + sorted(words)


def digits_tokenizer(folder: str) -> BertTokenizerFast:
    """A WordPiece tokenizer that knows every word of the digits captions and zero-shot prompts."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w") as handle:
        handle.write("\n".join(digits_vocabulary()) + "\n")
    return BertTokenizerFast(vocab=path)  # transformers 5 ignores vocab_file=


def tiny_dual_encoder(seed: int = 0, batch_free: bool = False, projection_dim: int = 16):
    """``test_resnet`` image tower (GroupNorm with ``batch_free``) + a 1-layer BERT without dropout, joined."""
    torch.manual_seed(seed)
    kwargs = {"norm_layer": "groupnorm1"} if batch_free else None
    encoder = ContrastiveEncoder(
        ContrastiveEncoderConfig(backbone="test_resnet", projection_dim=None, backbone_kwargs=kwargs)
    )
    text = BertModel(
        BertConfig(
            vocab_size=len(digits_vocabulary()),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    return build_dual_encoder(timm_image_tower(encoder, image_size=16), text, projection_dim=projection_dim)
