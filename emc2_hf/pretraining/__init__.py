"""The pre-training pipeline the recipes run: arguments, preset config files, and the run itself."""

from .arguments import DataArguments, ModelArguments
from .checks import RecipeArgumentError
from .config import build_recipe_parser, load_config, parse_recipe_arguments
from .plots import plot_comparison, plot_training_curves
from .run import build_augmentation, load_splits, main, run_pretraining

__all__ = [
    "DataArguments",
    "ModelArguments",
    "RecipeArgumentError",
    "build_augmentation",
    "build_recipe_parser",
    "load_config",
    "load_splits",
    "main",
    "parse_recipe_arguments",
    "plot_comparison",
    "plot_training_curves",
    "run_pretraining",
]
