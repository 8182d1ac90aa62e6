"""The CLIP-style fine-tuning recipe (``recipes/clip_finetune.py``): arguments and run."""

from .arguments import DualEncoderModelArguments, ImageTextDataArguments
from .run import build_model, main, parse_arguments, run_finetuning

__all__ = [
    "DualEncoderModelArguments",
    "ImageTextDataArguments",
    "build_model",
    "main",
    "parse_arguments",
    "run_finetuning",
]
