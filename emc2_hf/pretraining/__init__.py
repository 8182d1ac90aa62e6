"""The pre-training pipeline the recipes run: arguments, preset config files, and the run itself."""

from .arguments import DataArguments, ModelArguments
from .config import load_config, parse_recipe_arguments
from .run import build_augmentation, load_splits, main, run_pretraining

__all__ = [
    "DataArguments",
    "ModelArguments",
    "build_augmentation",
    "load_config",
    "load_splits",
    "main",
    "parse_recipe_arguments",
    "run_pretraining",
]
