"""``ContrastiveTrainingArguments``: the Trainer's arguments plus the contrastive objective's hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..objectives import OBJECTIVES


@dataclass
class ContrastiveTrainingArguments(TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] for [`ContrastiveTrainer`].

    Parameters that control the objective:

    > objective

    objective (`str`, defaults to `"emc2"`):
        `"emc2"` (Metropolis–Hastings negative sampling of the global loss (1), chain states re-encoded: exact),
        `"emc2_in_batch"` (the same chains without re-encoding: cheaper, biased toward the batch softmax), `"sogclr"`
        (moving-average normaliser), `"simclr"` (in-batch InfoNCE), `"dcl"` (decoupled InfoNCE: in-batch negatives
        only) or `"negative_cache"` (Gumbel-max negatives from a cache of every image's embedding). The registry
        (`emc2_hf.objectives.OBJECTIVES`) is the list; each objective's options map to the flags below through its
        `training_arguments`.
    inverse_temperature (`float`, defaults to `5.0`):
        β = 1/τ. The EMC² paper uses 14.28 at batch 32 and 5 at batch 256 on STL-10.

    > EMC²

    num_proposals (`int`, *optional*):
        R, Metropolis–Hastings proposals per anchor per step; default 2b − 2 (b: images in the global batch).
    burn_in (`int`, *optional*):
        P, leading proposals whose states are not used as samples; default R // 2.

    With `"emc2"` every view of a batch image keeps its own chain, and the chain states the batch does not hold
    (up to 2b views) are re-encoded with the current model in the views' forward pass: the collator delivers them
    from the DataLoader workers.

    > SogCLR

    sogclr_gamma (`float`, *optional*):
        γ, weight of the new estimate in `u ← (1 − γ) u + γ · mean exp(β s)`; default 0.9.

    > Negative cache (Lindgren et al., 2021)

    cache_refresh_fraction (`float`, *optional*):
        ρ, the fraction of the embedding cache re-embedded (unaugmented images, eval mode) every step, round-robin;
        default 0.01.
    cache_negatives (`int`, *optional*):
        Negatives per anchor drawn by Gumbel-max from `β·s` over the cache and re-encoded with gradient; default 1.

    > Batch selection (works with every objective)

    batch_selection (`str`, defaults to `"random"`):
        `"random"`, `"spectral_clustering"` or `"ordered_sgd"` (Cho et al. 2023): once per epoch the training set's
        views are embedded and the epoch's batches are chosen to hold high-loss pairs. Two-view image training.
    osgd_candidates (`int`, defaults to `4`):
        k, the random batches among which ordered SGD keeps the highest-loss one at every step.

    > Several processes

    sync_batch_norm (`bool`, *optional*):
        Convert BatchNorm to `SyncBatchNorm` so that N processes × b/N normalise like one process × b. Default: on
        when several processes run on GPUs; refused on CPU (torch's SyncBatchNorm needs CUDA).

    > Optimiser

    timm_optimizer (`str`, *optional*):
        Build the optimiser with timm's `create_optimizer_v2` instead of `optim`: `"lars"` (ImageNet-100 in the EMC²
        paper), `"adam"` (Adam with L2 weight decay, as the paper's STL-10 runs), `"sgd"`, `"lamb"`, ... Biases and
        normalisation weights get no weight decay and, with LARS, no trust-ratio adaptation.
    optimizer_momentum (`float`, defaults to `0.9`):
        Momentum of a timm SGD-family optimiser (LARS, SGD).
    lars_trust_coefficient (`float`, defaults to `1e-3`):
        η of LARS (timm's): a weight's step is scaled by `η ‖w‖ / (‖∇w‖ + λ ‖w‖)`.

    > Monitoring

    knn_monitor_steps (`int`, *optional*):
        Every this many steps, log the 1-NN accuracy of the backbone features on the probe splits (needs a probe
        evaluator) as `knn_monitor_accuracy`, through the Trainer's loggers (`report_to`). Cheaper than the full
        probes of `eval_steps`.

    global_loss_steps (`int`, *optional*):
        With fixed augmentations (the collator's `num_augmentations`), every this many steps compute the exact global
        loss (1) over the whole training set and the squared norm of its gradient with respect to all trainable
        parameters, in eval mode (BatchNorm with running statistics), and log them as `global_loss` and
        `global_gradient_norm_squared` (the paper's Fig. 7). Refused for fresh augmentations; a dataset larger than
        20,000 views logs a warning and is skipped.

    > Dual encoders (image–text pairs; the collator is an `ImageTextCollator`)

    learn_logit_scale (`bool`, defaults to `True`):
        Train the model's `logit_scale` (CLIP's learned temperature, `β = exp(logit_scale)`), clamped to
        `[0, ln 100]` before every step as open_clip does; every objective and the chains' acceptances use its current
        value. `False`: the scale is frozen and `inverse_temperature` is β.
    freeze_image_tower (`bool`, defaults to `False`):
        Keep the image tower's weights (and BatchNorm statistics) fixed; its projection still trains (LiT-style).
    freeze_text_tower (`bool`, defaults to `False`):
        Keep the text tower's weights fixed; its projection still trains.

    > Export

    export_projection_head (`bool`, defaults to `False`):
        Whether `export()` and `push_to_hub()` ship the projection head beside the backbone.

    Defaults changed from [`~transformers.TrainingArguments`]: `learning_rate=1e-3`, `weight_decay=1e-4`,
    `lr_scheduler_type="cosine"`, `logging_steps=10`, `dataloader_drop_last=True` (a last batch of one image would
    have no negatives), `remove_unused_columns=False` (the collator reads the raw image column), and
    `dataloader_pin_memory` is turned off when no accelerator is present (pinning only helps copies to a GPU).
    """

    objective: str = field(
        default="emc2",
        metadata={"help": "Contrastive objective.", "choices": sorted(OBJECTIVES)},
    )
    inverse_temperature: float = field(
        default=5.0,
        metadata={
            "help": "β = 1/τ, the inverse temperature of the softmax over negatives (paper: 14.28 at b=32, 5 at "
            "b=256)."
        },
    )
    num_proposals: int | None = field(
        default=None,
        metadata={"help": "EMC²: Metropolis–Hastings proposals R per anchor per step (default: 2b-2)."},
    )
    burn_in: int | None = field(
        default=None,
        metadata={"help": "EMC²: burn-in P, proposals whose states are not used as samples (default: R//2)."},
    )
    emc2_weighting: str | None = field(
        default=None,
        metadata={
            "help": "EMC²: how chain samples become negative weights: 'samples' (eq. (11)'s visit frequencies), "
            "'recycled' (each sample replaced by its expectation given the step's proposal) or 'conditional' (by "
            "its expectation given the sweep's candidate set). Default: the objective's.",
            "choices": ["samples", "recycled", "conditional"],
        },
    )
    emc2_chain_fraction: float | None = field(
        default=None,
        metadata={
            "help": "EMC²: fraction q of anchor views that run their chain each epoch (fewer re-encoded states); the "
            "others use the in-batch softmax, which is also the control variate of the rest (unbiased). Default 1."
        },
    )
    sogclr_gamma: float | None = field(
        default=None,
        metadata={"help": "SogCLR: moving-average weight γ of the new estimate of u, in (0, 1] (default: 0.9)."},
    )
    cache_refresh_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Negative cache: fraction ρ of the cache re-embedded each step, round-robin (default: 0.01; the "
            "whole cache is refreshed every 1/ρ steps)."
        },
    )
    cache_negatives: int | None = field(
        default=None,
        metadata={"help": "Negative cache: negatives drawn per anchor by Gumbel-max from the cache (default: 1)."},
    )
    batch_selection: str = field(
        default="random",
        metadata={
            "help": "How each epoch's batches are formed: 'random' (a shuffle), 'spectral_clustering' (high-loss "
            "batches by spectral clustering of the loss-bound affinity, Cho et al. 2023) or 'ordered_sgd' (the "
            "highest-loss of --osgd_candidates random batches). Works with every objective.",
            "choices": ["random", "spectral_clustering", "ordered_sgd"],
        },
    )
    osgd_candidates: int = field(
        default=4, metadata={"help": "ordered_sgd batch selection: random candidate batches per step (k)."}
    )
    sync_batch_norm: bool | None = field(
        default=None,
        metadata={
            "help": "Convert the encoder's BatchNorm layers to SyncBatchNorm, so that several processes normalise "
            "with the statistics of the global batch (as one process would). Default: on with several GPU "
            "processes; it needs CUDA (refused on CPU)."
        },
    )

    learn_logit_scale: bool = field(
        default=True,
        metadata={
            "help": "Dual encoders: train the model's logit_scale (β = exp(logit_scale), clamped at ln 100); false: "
            "β = --inverse_temperature, fixed."
        },
    )
    freeze_image_tower: bool = field(
        default=False, metadata={"help": "Dual encoders: freeze the image tower (its projection still trains)."}
    )
    freeze_text_tower: bool = field(
        default=False, metadata={"help": "Dual encoders: freeze the text tower (its projection still trains)."}
    )

    export_projection_head: bool = field(
        default=False,
        metadata={"help": "Include the projection head in export() / push_to_hub() (default: the backbone only)."},
    )

    timm_optimizer: str | None = field(
        default=None,
        metadata={
            "help": "Use timm's optimiser of this name ('lars', 'adam', 'sgd', 'lamb', ...) instead of --optim."
        },
    )
    optimizer_momentum: float = field(default=0.9, metadata={"help": "Momentum of timm's LARS / SGD."})
    lars_trust_coefficient: float = field(default=1e-3, metadata={"help": "LARS trust coefficient η."})
    knn_monitor_steps: int | None = field(
        default=None,
        metadata={"help": "Log the 1-NN accuracy on the probe splits every N steps (knn_monitor_accuracy)."},
    )
    global_loss_steps: int | None = field(
        default=None,
        metadata={
            "help": "With fixed augmentations (--num_augmentations), log the exact global loss (1) and its squared "
            "gradient norm over the whole training set every N steps (global_loss, global_gradient_norm_squared)."
        },
    )

    learning_rate: float = field(default=1e-3, metadata={"help": "The initial learning rate (Adam/AdamW)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    dataloader_drop_last: bool = field(
        default=True, metadata={"help": "Drop the last incomplete batch (a batch of one image has no negatives)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Drop dataset columns the collator does not read."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataloader_pin_memory and (self.use_cpu or not _accelerator_available()):
            self.dataloader_pin_memory = False
        if self.fp16 and (self.use_cpu or not _accelerator_available()):
            raise ValueError(
                "--fp16 needs a GPU: on CPU the Trainer accepts it but runs in float32 (the encoder's outputs stay "
                "float32, measured), so nothing would be mixed precision; use --bf16 on CPU, or run on a GPU"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")
        if not self.inverse_temperature > 0:
            raise ValueError(f"--inverse_temperature (β = 1/τ) must be > 0, got {self.inverse_temperature}")
        if self.num_proposals is not None and self.num_proposals < 1:
            raise ValueError(f"--num_proposals (R) must be >= 1, got {self.num_proposals}")
        if self.burn_in is not None and self.burn_in < 0:
            raise ValueError(f"--burn_in (P) must be >= 0, got {self.burn_in}")
        if self.num_proposals is not None and self.burn_in is not None and self.burn_in >= self.num_proposals:
            raise ValueError(
                f"--burn_in ({self.burn_in}) must be smaller than --num_proposals ({self.num_proposals}) so that "
                "samples "
                "remain after the burn-in"
            )
        if self.timm_optimizer is not None:
            _check_timm_optimizer(self.timm_optimizer)
        if not 0 <= self.optimizer_momentum < 1:
            raise ValueError(f"--optimizer_momentum must be in [0, 1), got {self.optimizer_momentum}")
        if not self.lars_trust_coefficient > 0:
            raise ValueError(f"--lars_trust_coefficient must be > 0, got {self.lars_trust_coefficient}")
        if self.knn_monitor_steps is not None and self.knn_monitor_steps < 1:
            raise ValueError(f"--knn_monitor_steps must be >= 1 (or unset), got {self.knn_monitor_steps}")
        if self.global_loss_steps is not None and self.global_loss_steps < 1:
            raise ValueError(f"--global_loss_steps must be >= 1 (or unset), got {self.global_loss_steps}")
        if self.emc2_chain_fraction is not None and not 0 < self.emc2_chain_fraction <= 1:
            raise ValueError(f"--emc2_chain_fraction must be in (0, 1], got {self.emc2_chain_fraction}")
        if self.sogclr_gamma is not None and not 0 < self.sogclr_gamma <= 1:
            raise ValueError(f"--sogclr_gamma must be in (0, 1], got {self.sogclr_gamma}")
        if self.cache_refresh_fraction is not None and not 0 < self.cache_refresh_fraction <= 1:
            raise ValueError(f"--cache_refresh_fraction must be in (0, 1], got {self.cache_refresh_fraction}")
        if self.cache_negatives is not None and self.cache_negatives < 1:
            raise ValueError(f"--cache_negatives must be >= 1, got {self.cache_negatives}")
        if self.osgd_candidates < 1:
            raise ValueError(f"--osgd_candidates must be >= 1, got {self.osgd_candidates}")
        if self.per_device_train_batch_size < 2:
            raise ValueError(
                f"--per_device_train_batch_size {self.per_device_train_batch_size} leaves anchors without negatives: "
                "contrastive training needs at least 2 images per batch"
            )


def _accelerator_available() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _check_timm_optimizer(name: str) -> None:
    from timm.optim import list_optimizers

    available = list_optimizers()
    if name.lower() not in available:
        raise ValueError(f"--timm_optimizer {name!r} is not a timm optimiser; choose one of {sorted(available)}")
