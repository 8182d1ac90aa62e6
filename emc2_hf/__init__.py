"""emc2_hf: contrastive learning with small batches (EMC², SogCLR, SimCLR) on the Hugging Face Trainer."""

from transformers import AutoConfig, AutoModel

from .data import ContrastiveCollator, SimCLRAugmentation, load_digits_dataset
from .evaluation import ProbeCallback, ProbeEvaluator, probe_metrics
from .hub import ModelCardData, export_encoder, load_projection_head
from .modeling import ContrastiveEncoder, ContrastiveEncoderConfig, ContrastiveEncoderOutput
from .objectives import (
    EMC2Objective,
    SimCLRObjective,
    SogCLRObjective,
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
    "ModelCardData",
    "ProbeCallback",
    "ProbeEvaluator",
    "SimCLRAugmentation",
    "SimCLRObjective",
    "SogCLRObjective",
    "build_objective",
    "export_encoder",
    "global_contrastive_loss",
    "load_digits_dataset",
    "load_projection_head",
    "probe_metrics",
]
