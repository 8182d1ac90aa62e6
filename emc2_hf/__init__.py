"""emc2_hf: contrastive learning with small batches (EMC², SogCLR, SimCLR) on the Hugging Face Trainer."""

from transformers import AutoConfig, AutoModel

from .data import (
    ContrastiveCollator,
    ImageTextCollator,
    ImageTextTransforms,
    SimCLRAugmentation,
    load_digits_dataset,
    load_image_text_split,
)
from .evaluation import (
    ProbeCallback,
    ProbeEvaluator,
    RetrievalEvaluator,
    ZeroShotEvaluator,
    combine_evaluators,
    probe_metrics,
)
from .hub import ModelCardData, export_encoder, load_projection_head
from .modeling import (
    ContrastiveEncoder,
    ContrastiveEncoderConfig,
    ContrastiveEncoderOutput,
    build_dual_encoder,
    freeze_towers,
    timm_image_tower,
)
from .objectives import (
    EMC2Objective,
    SimCLRObjective,
    SogCLRObjective,
    SymmetricObjective,
    build_image_text_objective,
    build_objective,
    global_contrastive_loss,
)
from .training import ContrastiveTrainer, ContrastiveTrainingArguments

__version__ = "0.1.0"

AutoConfig.register(ContrastiveEncoderConfig.model_type, ContrastiveEncoderConfig, exist_ok=True)
AutoModel.register(ContrastiveEncoderConfig, ContrastiveEncoder, exist_ok=True)

__all__ = [
    "ContrastiveCollator",
    "ContrastiveEncoder",
    "ContrastiveEncoderConfig",
    "ContrastiveEncoderOutput",
    "ContrastiveTrainer",
    "ContrastiveTrainingArguments",
    "EMC2Objective",
    "ImageTextCollator",
    "ImageTextTransforms",
    "ModelCardData",
    "ProbeCallback",
    "ProbeEvaluator",
    "RetrievalEvaluator",
    "SimCLRAugmentation",
    "SimCLRObjective",
    "SogCLRObjective",
    "SymmetricObjective",
    "ZeroShotEvaluator",
    "build_dual_encoder",
    "build_image_text_objective",
    "build_objective",
    "combine_evaluators",
    "export_encoder",
    "freeze_towers",
    "global_contrastive_loss",
    "load_digits_dataset",
    "load_image_text_split",
    "load_projection_head",
    "probe_metrics",
    "timm_image_tower",
]
