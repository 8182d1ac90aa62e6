"""``ContrastiveTrainer``: the transformers Trainer with a contrastive objective and its per-sample state."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from huggingface_hub import HfApi
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.collator import ContrastiveCollator
from ..data.indexed import with_dataset_index
from ..evaluation.callbacks import KNNMonitorCallback, ProbeCallback
from ..evaluation.diagnostics import GlobalLossCallback, check_diagnostics_size
from ..evaluation.probes import ProbeEvaluator
from ..hub.export import export_encoder
from ..hub.model_card import ModelCardData, objective_settings, probe_rows, render_model_card
from ..objectives import (
    ContrastiveObjective,
    build_image_text_objective,
    build_objective,
    objective_options,
    two_view_problem,
)
from ..objectives.emc2 import CITATION as EMC2_CITATION
from ..sampling.sample_state import ChainStateTable, load_per_sample_state, save_per_sample_state
from .arguments import ContrastiveTrainingArguments
from .batch_selection_callback import BatchSelectionCallback, load_batch_selection_state, save_batch_selection_state
from .chain_starts import current_chain_starts
from .distributed import gather_per_view, gather_rows, gather_views, world_size
from .negative_cache_step import draw_cache_negatives, fill_cache
from .optimizers import create_timm_optimizer

logger = logging.getLogger(__name__)


class CollatorEpochCallback(TrainerCallback):
    """Tells the collator the epoch at every epoch start (before the epoch's DataLoader iterator is created)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.collator, "epoch"):
            self.collator.epoch = int(state.epoch or 0)


def _log_tensorboard_into_output_dir(trainer: Trainer) -> None:
    """Point TensorBoard at ``output_dir/runs/<date>``: its callback picks a folder only at train begin, so anything
    logged earlier (e.g. the untrained encoder's probes) would open a writer in ``./runs`` of the working directory."""
    from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = os.path.join(trainer.args.output_dir, default_logdir())


def _check_batch_fits(args: ContrastiveTrainingArguments, num_rows: int, objective: ContrastiveObjective) -> None:
    """Refuse, before any work, a global batch the objective cannot use or the data cannot fill."""
    per_step = args.per_device_train_batch_size * args.world_size
    objective.validate_batch_size(per_step)
    if args.dataloader_drop_last and num_rows < per_step:
        raise ValueError(
            f"the training set has {num_rows} rows but one step takes {per_step} images "
            f"(per_device_train_batch_size {args.per_device_train_batch_size} × {args.world_size} process(es)) and "
            "dataloader_drop_last=True drops the short batch: no step would run. Lower "
            "--per_device_train_batch_size or add data."
        )


class CacheFillCallback(TrainerCallback):
    """Embeds every training image into the negative cache at train begin (what a resumed checkpoint holds is kept)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        filled = fill_cache(trainer.objective, model, trainer.train_dataset, trainer.data_collator, args.device)
        if filled:
            logger.info("negative cache: embedded %d training images", filled)


def _embedding_dim(model: nn.Module) -> int | None:
    """Width of ``model(...).embeddings`` from its config (the projection's, else the backbone features')."""
    config = getattr(model, "config", None)
    return getattr(config, "projection_dim", None) or getattr(config, "feature_dim", None)


def _with_sync_batch_norm(model: nn.Module, args: ContrastiveTrainingArguments) -> nn.Module:
    """``--sync_batch_norm``: BatchNorm → SyncBatchNorm (default: on with several GPU processes, off otherwise)."""
    has_batch_norm = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    enabled = args.sync_batch_norm
    if enabled is None:
        enabled = args.world_size > 1 and args.device.type == "cuda"
    if not enabled or not has_batch_norm:
        return model
    if args.device.type != "cuda":
        raise ValueError(
            f"--sync_batch_norm true needs CUDA devices (torch's SyncBatchNorm does not run on "
            f"{args.device.type}); on CPU leave it off, or use a batch-free encoder (--backbone_kwargs "
            '\'{"norm_layer": "groupnorm"}\' '
            "--projection_batch_norm false) so that N processes train exactly like one"
        )
    if args.world_size > 1:
        logger.info("BatchNorm layers converted to SyncBatchNorm: statistics of the global batch on every process")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def is_image_text(collator: Any) -> bool:
    """Whether ``collator`` makes image–text batches (an :class:`~emc2_hf.data.ImageTextCollator`)."""
    return getattr(collator, "modality", "image_views") == "image_text"


def _max_captions(dataset: Any, collator: Any) -> int:
    """The most captions a row has (1 when the collator always takes the first): text→image chains per pair."""
    if getattr(collator, "caption_choice", "first") == "first":
        return 1
    captions = dataset[collator.caption_column]
    return max([len(value) if isinstance(value, list | tuple) else 1 for value in captions], default=1)


def _global_loss_callback(args: ContrastiveTrainingArguments, collator: Any, dataset: Any) -> GlobalLossCallback:
    """``--global_loss_steps``: exact diagnostics over every fixed augmentation of every training image."""
    from ..data.images import decode_image

    num_views = getattr(collator, "num_augmentations", None)
    if num_views is None:
        raise ValueError(
            "--global_loss_steps needs a finite dataset of fixed augmentations (--num_augmentations A): with fresh "
            "augmentations the global loss (1) has infinitely many views"
        )
    try:
        check_diagnostics_size(len(dataset), num_views)
    except ValueError as error:  # too large: the callback says so once and does nothing
        logger.warning("--global_loss_steps is ignored: %s", error)
        return GlobalLossCallback(torch.zeros(len(dataset), num_views, 1), args.global_loss_steps)
    views = []
    for index in range(len(dataset)):
        image = decode_image(dataset[index][collator.image_column], row=index)
        keys = [collator.fixed_augmentation_key(index, augmentation) for augmentation in range(num_views)]
        views.append(torch.stack([collator.render(image, key) for key in keys]))
    return GlobalLossCallback(torch.stack(views), args.global_loss_steps)


class ContrastiveTrainer(Trainer):
    """Trains an encoder with a contrastive objective (EMC², SogCLR, SimCLR, …) chosen by ``args.objective``.

    A batch travels collator → :meth:`compute_loss` → model (embeddings of the two views, and of the chain states
    the collator delivered) → objective (negative weights from its per-sample state) → loss. The objective's
    per-sample state is written into every checkpoint as ``per_sample_state.safetensors`` and restored by
    ``train(resume_from_checkpoint=...)``. Metrics the objective reports (EMC²'s ``acceptance_rate``,
    ``reencoded_fraction``, …) are averaged over each logging window and logged with the loss, beside
    ``knn_monitor_accuracy`` when ``args.knn_monitor_steps`` is set and the values of any callback with a
    ``pop_pending()`` method (e.g. :class:`~emc2_hf.evaluation.GlobalLossCallback`). With ``args.timm_optimizer`` the
    optimiser is timm's (:meth:`create_optimizer`). Under several processes the objective sees the global batch on
    every process, and the probes run on the main process.

    **EMC²'s chain states** (objectives with ``reencodes_chain_states``): the chains live in the objective; a CPU
    shared-memory copy (:class:`~emc2_hf.sampling.ChainStateTable`) is attached to the collator, which — in the
    DataLoader workers — reads where each view's chain starts and delivers the state images the batch lacks, each
    re-created as the training view the chain stored. They are encoded in the same forward pass as the views (so
    BatchNorm sees them with the batch) and enter the objective as state columns; after the step the table is
    updated from the objective's chains.

    **The negative cache** (objectives with ``reencodes_cache_negatives``): the cache is filled at train begin; each
    step refreshes ``⌈ρ m⌉`` entries, draws every anchor's negatives from it (anchors encoded in eval mode, without
    gradient) and encodes the drawn images with gradient in the views' forward pass, as state columns
    (:mod:`~emc2_hf.training.negative_cache_step`).

    **Batch selection**: :meth:`get_batch_sampler` (``--batch_selection``) may replace the shuffle with a sampler that
    chooses every epoch's batches from embeddings of the training set, computed at each epoch start
    (:class:`~emc2_hf.training.batch_selection_callback.BatchSelectionCallback`); its batches go into checkpoints.
    ``--sync_batch_norm`` converts BatchNorm layers to ``SyncBatchNorm`` (default: with several CUDA processes).

    Args:
        model: a model whose forward takes ``pixel_values`` and returns ``embeddings`` (and ``features`` for the
            probes), e.g. :class:`~emc2_hf.ContrastiveEncoder`.
        args: :class:`ContrastiveTrainingArguments`.
        train_dataset: map-style dataset of rows with an image column; the dataset index column is added if missing.
        data_collator: a :class:`~emc2_hf.ContrastiveCollator` (default one if omitted).
        probe_evaluator: a :class:`~emc2_hf.ProbeEvaluator`; if given, :meth:`evaluate` reports linear-probe, 1-NN and
            few-shot accuracies, and they also run at the end of training (and every ``eval_steps`` with
            ``eval_strategy="steps"``).
        monitor_evaluator: what ``args.knn_monitor_steps`` measures 1-NN accuracy on (default: ``probe_evaluator``;
            a smaller one keeps monitoring cheap).
        objective: a ready objective, overriding the one ``args`` describe.
        model_card_data: where the data came from, for the model card of :meth:`export` / :meth:`push_to_hub`.
        **kwargs: passed to :class:`transformers.Trainer`.
    """

    def __init__(
        self,
        model: nn.Module,
        args: ContrastiveTrainingArguments,
        train_dataset: Any,
        data_collator: ContrastiveCollator | None = None,
        probe_evaluator: ProbeEvaluator | None = None,
        monitor_evaluator: ProbeEvaluator | None = None,
        objective: ContrastiveObjective | None = None,
        model_card_data: ModelCardData | None = None,
        callbacks: list | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, ContrastiveTrainingArguments):
            raise TypeError(
                "ContrastiveTrainer needs ContrastiveTrainingArguments (it carries the objective's settings)"
            )
        data_collator = data_collator if data_collator is not None else ContrastiveCollator()
        train_dataset = with_dataset_index(train_dataset, data_collator.image_column, data_collator.index_column)
        if getattr(data_collator, "seed", False) is None:
            data_collator.seed = args.seed  # views keyed by (seed, epoch, index, view): resumable, worker-independent
        image_text = is_image_text(data_collator)
        if objective is None:
            options = objective_options(args)
            if image_text:
                objective = build_image_text_objective(
                    args.objective,
                    len(train_dataset),
                    args.inverse_temperature,
                    seed=args.seed,
                    captions_per_pair=_max_captions(train_dataset, data_collator),
                    **options,
                )
            else:
                objective = build_objective(
                    args.objective,
                    num_samples=len(train_dataset),
                    inverse_temperature=args.inverse_temperature,
                    seed=args.seed,
                    num_slots=getattr(data_collator, "num_state_slots", 2),
                    embedding_dim=_embedding_dim(model),
                    **options,
                )
        _check_batch_fits(args, len(train_dataset), objective)
        if image_text:
            from ..modeling.dual_encoder import freeze_towers

            if args.emc2_chain_fraction is not None and args.emc2_chain_fraction < 1:
                raise ValueError("--emc2_chain_fraction < 1 is not supported for image–text pairs yet; leave it at 1")

            freeze_towers(model, image=args.freeze_image_tower, text=args.freeze_text_tower)
            if not args.learn_logit_scale and isinstance(getattr(model, "logit_scale", None), torch.Tensor):
                model.logit_scale.requires_grad_(False)
        elif args.freeze_image_tower or args.freeze_text_tower:
            raise ValueError("--freeze_image_tower / --freeze_text_tower apply to dual encoders (image–text data)")
        if image_text and objective.reencodes_cache_negatives:
            raise ValueError("the negative cache is implemented for two-view image training, not image–text pairs yet")
        if image_text and args.batch_selection != "random":
            raise ValueError("--batch_selection applies to two-view image training, not image–text pairs yet")
        model = _with_sync_batch_norm(model, args)
        chain_table = None
        if image_text and objective.reencodes_chain_states:
            chain_table = {direction: ChainStateTable(part.chains) for direction, part in objective.directions.items()}
            data_collator.attach_chain_states(chain_table, train_dataset)
        elif objective.reencodes_chain_states:
            if not hasattr(data_collator, "attach_chain_states"):
                raise ValueError(
                    f"the {objective.name} objective re-encodes chain states, which the collator must deliver; use "
                    "ContrastiveCollator (or a collator with attach_chain_states), or --objective emc2_in_batch"
                )
            chain_table = ChainStateTable(objective.chains)
            data_collator.attach_chain_states(
                chain_table, train_dataset, chain_fraction=getattr(objective, "chain_fraction", 1.0)
            )
        callbacks = [*(callbacks or []), CollatorEpochCallback(data_collator)]
        if probe_evaluator is not None and not any(isinstance(callback, ProbeCallback) for callback in callbacks):
            callbacks.append(ProbeCallback())
        knn_monitor = None
        if args.knn_monitor_steps is not None:
            monitor_evaluator = monitor_evaluator if monitor_evaluator is not None else probe_evaluator
            if monitor_evaluator is None:
                raise ValueError(
                    "--knn_monitor_steps needs labelled data to measure on: pass probe_evaluator=ProbeEvaluator(...)"
                )
            knn_monitor = KNNMonitorCallback(monitor_evaluator, args.knn_monitor_steps)
            callbacks.append(knn_monitor)
        batch_sampler = self.get_batch_sampler(train_dataset, args)
        if batch_sampler is not None:
            callbacks.append(BatchSelectionCallback(self))
        if objective.reencodes_cache_negatives:
            callbacks.append(CacheFillCallback(self))
        if args.global_loss_steps is not None:
            if image_text:
                raise ValueError("--global_loss_steps applies to two-view image training, not to image–text pairs")
            callbacks.append(_global_loss_callback(args, data_collator, train_dataset))
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=data_collator,
            callbacks=callbacks,
            **kwargs,
        )
        _log_tensorboard_into_output_dir(self)
        self.objective = objective
        self.batch_sampler = batch_sampler
        self.image_text = image_text
        self.chain_table = chain_table
        self.probe_evaluator = probe_evaluator
        self._knn_monitor = knn_monitor
        self.model_card_data = model_card_data if model_card_data is not None else ModelCardData()
        self._objective_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._micro_step_position = (-1, 0)
        self.last_evaluation: tuple[int, str, dict[str, float]] | None = None
        """``(global_step, metric_key_prefix, metrics)`` of the latest :meth:`evaluate`."""

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        required = getattr(self.data_collator, "required_columns", [])
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *required]))

    def get_batch_sampler(self, dataset: Any, args: ContrastiveTrainingArguments) -> Any:
        """The sampler of each step's global batch, or ``None`` for the Trainer's shuffle (``--batch_selection
        random``). Override to bring your own: it yields, for every global batch, its ``N`` per-process chunks in
        rank order (Accelerate hands chunk ``i`` to process ``i mod N``), and may have ``update(embeddings, β, epoch)``
        (called at every epoch start by :class:`BatchSelectionCallback`), ``state_dict`` / ``load_state_dict``."""
        if args.batch_selection == "random":
            return None
        from ..sampling.batch_selection import build_batch_sampler

        options = {"num_candidates": args.osgd_candidates} if args.batch_selection == "ordered_sgd" else {}
        return build_batch_sampler(
            args.batch_selection,
            num_samples=len(dataset),
            batch_size=args.per_device_train_batch_size * args.world_size,
            num_processes=args.world_size,
            seed=args.seed,
            **options,
        )

    def get_train_dataloader(self) -> Any:
        """The Trainer's loader, or one driven by :meth:`get_batch_sampler`'s sampler when there is one."""
        if self.batch_sampler is None:
            return super().get_train_dataloader()
        from functools import partial

        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        return self.accelerator.prepare(loader)

    def _next_micro_step(self) -> int:
        """Index of the current micro-batch within the optimisation step (gradient accumulation)."""
        step, micro_step = self._micro_step_position
        micro_step = micro_step + 1 if step == self.state.global_step else 0
        self._micro_step_position = (self.state.global_step, micro_step)
        return micro_step

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Encode both views (``pixel_values: [2b, 3, H, W]``) and the delivered chain states
        (``state_pixel_values: [k, 3, H, W]``) in one forward pass, and evaluate the objective on the global batch.
        Image–text batches go through :func:`~emc2_hf.tasks.image_text_step_problems` instead."""
        if self.image_text:
            return self._image_text_loss(model, inputs, return_outputs)
        pixel_values = inputs["pixel_values"]
        num_views = pixel_values.shape[0]
        state_pixel_values = inputs.get("state_pixel_values")
        encodes_states = self.objective.reencodes_chain_states
        if encodes_states and state_pixel_values is None:
            raise ValueError(
                f"the {self.objective.name} objective needs the chain-state images with every batch "
                "(state_pixel_values); the collator delivers them once attach_chain_states was called"
            )
        if encodes_states and hasattr(self.objective, "chain_starts"):
            inputs = current_chain_starts(self.objective, inputs, self.train_dataset, self.data_collator)
            state_pixel_values = inputs["state_pixel_values"]
        if encodes_states and state_pixel_values.shape[0]:
            pixel_values = torch.cat([pixel_values, state_pixel_values.to(pixel_values)])
        micro_step = self._next_micro_step()
        cache_negatives = None
        if self.objective.reencodes_cache_negatives:
            cache_negatives = draw_cache_negatives(
                self.objective,
                self.accelerator.unwrap_model(model),
                self.train_dataset,
                self.data_collator,
                inputs,
                step=self.state.global_step,
                micro_step=micro_step,
                inverse_temperature=self.args.inverse_temperature,
            )
            pixel_values = torch.cat([pixel_values, cache_negatives.pixel_values])
        outputs = model(pixel_values=pixel_values)
        embeddings = outputs.embeddings
        if pixel_values.shape[0] != num_views and isinstance(outputs, dict):
            outputs = type(outputs)(
                **{
                    key: value[:num_views]
                    if isinstance(value, torch.Tensor) and value.shape[0] == pixel_values.shape[0]
                    else value
                    for key, value in outputs.items()
                }
            )
        state = next(self.objective.buffers(), None)
        if state is not None and state.device != embeddings.device:
            self.objective.to(embeddings.device)
        # Every process evaluates the objective on the global batch, so per-sample state stays identical everywhere.
        view_embeddings, dataset_indices = gather_views(
            embeddings[:num_views], inputs[self.data_collator.index_column]
        )
        arguments: dict[str, torch.Tensor] = {}
        for name in ("view_keys", "view_slots"):
            if name in inputs:
                arguments[name] = gather_per_view(inputs[name])
        if encodes_states:
            arguments.update(
                state_embeddings=gather_rows(embeddings[num_views:], differentiable=True),
                state_keys=gather_rows(inputs["state_index"]),
                state_views=gather_rows(inputs["state_view"]),
                start_keys=gather_per_view(inputs["start_index"]),
                start_views=gather_per_view(inputs["start_view"]),
            )
            if "chain_active" in inputs:
                arguments["chain_anchors"] = gather_per_view(inputs["chain_active"])
        if cache_negatives is not None:
            arguments.update(cache_negatives.state_columns(embeddings[num_views:]))
        problem = two_view_problem(view_embeddings, dataset_indices, **arguments)
        objective_output = self.objective(problem, step=self.state.global_step, micro_step=micro_step)
        if self.chain_table is not None:
            self.chain_table.update(self.objective.chains, problem.anchor_keys)
        for name, value in objective_output.metrics.items():
            self._objective_metrics[name].append(value.detach())
        return (objective_output.loss, outputs) if return_outputs else objective_output.loss

    def _image_text_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool) -> Any:
        from ..tasks import image_text_step_problems

        state = next(self.objective.buffers(), None)
        if state is not None and state.device != inputs["pixel_values"].device:
            self.objective.to(inputs["pixel_values"].device)
        problems, outputs = image_text_step_problems(
            model,
            inputs,
            index_column=self.data_collator.index_column,
            with_states=self.objective.reencodes_chain_states,
            inverse_temperature=self.args.inverse_temperature,
            learn_logit_scale=self.args.learn_logit_scale,
        )
        objective_output = self.objective(problems, step=self.state.global_step, micro_step=self._next_micro_step())
        if self.chain_table is not None:
            for (direction, table), problem in zip(self.chain_table.items(), problems, strict=True):
                table.update(self.objective.directions[direction].chains, problem.anchor_keys)
        for name, value in objective_output.metrics.items():
            self._objective_metrics[name].append(value.detach())
        if self.args.learn_logit_scale:
            self._objective_metrics["temperature"].append(1.0 / problems.image_to_text.inverse_temperature.detach())
        return (objective_output.loss, outputs) if return_outputs else objective_output.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._objective_metrics:
            for name, values in self._objective_metrics.items():
                logs[name] = round(torch.stack(values).float().mean().item(), 4)
            self._objective_metrics.clear()
        if "loss" in logs:
            for callback in self.callback_handler.callbacks:
                if callable(getattr(callback, "pop_pending", None)):
                    logs.update(callback.pop_pending())
        super().log(logs, start_time)

    def floating_point_ops(self, inputs: dict[str, torch.Tensor | Any]) -> int:
        """0: transformers' estimate, 6 · parameters · input elements, counts language-model tokens, not the FLOPs of
        an image encoder (and re-counting the parameters costs about 1 ms every step)."""
        return 0

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """``args.timm_optimizer`` (e.g. LARS) when set, else the Trainer's ``args.optim``."""
        if self.optimizer is None and self.args.timm_optimizer is not None:
            self.optimizer = create_timm_optimizer(
                self.model if model is None else model,
                self.args.timm_optimizer,
                learning_rate=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                momentum=self.args.optimizer_momentum,
                trust_coefficient=self.args.lars_trust_coefficient,
            )
            return self.optimizer
        return super().create_optimizer(model)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Linear-probe, 1-NN and few-shot accuracies of the backbone features (needs ``probe_evaluator``)."""
        if self.probe_evaluator is None:
            raise ValueError(
                "ContrastiveTrainer.evaluate needs a probe_evaluator "
                "(a ProbeEvaluator over labelled train/test splits)"
            )
        model = self.accelerator.unwrap_model(self.model)
        if world_size() > 1:
            # The main process alone extracts features and fits the probes (N processes would repeat the same
            # work and compete for the CPU); the others receive its numbers.
            payload = [self.probe_evaluator(model, device=self.args.device) if self.is_world_process_zero() else None]
            values = broadcast_object_list(payload, from_process=0)[0]
        else:
            values = self.probe_evaluator(model, device=self.args.device)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in values.items()}
        self.last_evaluation = (self.state.global_step, metric_key_prefix, metrics)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            checkpoint = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_per_sample_state(self.objective, checkpoint)
            if self.batch_sampler is not None and hasattr(self.batch_sampler, "state_dict"):
                save_batch_selection_state(self.batch_sampler, checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_per_sample_state(self.objective, resume_from_checkpoint)
        if self.batch_sampler is not None and hasattr(self.batch_sampler, "load_state_dict"):
            load_batch_selection_state(self.batch_sampler, resume_from_checkpoint)
        if isinstance(self.chain_table, dict):
            for direction, table in self.chain_table.items():
                table.refresh(self.objective.directions[direction].chains)
        elif self.chain_table is not None:
            self.chain_table.refresh(self.objective.chains)

    # ---- Hub: the export, not the raw training checkpoint, is what gets pushed ----

    def model_card(
        self, repo_id: str | None = None, include_projection_head: bool | None = None, export_dir: str | None = None
    ) -> str:
        """The encoder's model card: objective and hyper-parameters, data, training length, probe accuracies.

        ``repo_id`` (else the pushed repository, else ``args.hub_model_id``) is what the card's snippets load; without
        one they load the local export folder and the card says how to push it. The objective's settings are the
        numbers used (e.g. EMC²'s R and P at this run's batch), and the untrained encoder's probes
        (``model_card_data.untrained_metrics``) stand beside the trained ones.
        """
        from .. import __version__

        model = self.accelerator.unwrap_model(self.model)
        if self.image_text:
            from ..hub.dual_export import dual_encoder_model_card

            repo_id = repo_id or self.hub_model_id or self.args.hub_model_id
            local_dir = export_dir or os.path.join(self.args.output_dir, "export")
            return dual_encoder_model_card(
                model, self.dual_encoder_card_data(), repo_id or local_dir, has_tokenizer=self._tokenizer() is not None
            )
        augmentation = self.data_collator.augmentation
        card = self.model_card_data
        repo_id = repo_id or self.hub_model_id or self.args.hub_model_id
        local_dir = export_dir or os.path.join(self.args.output_dir, "export")
        if include_projection_head is None:
            include_projection_head = self.args.export_projection_head
        step, prefix, metrics = self.last_evaluation or (None, "eval", {})
        citations = list(dict.fromkeys([self.objective.citation, EMC2_CITATION]))  # the library's paper, always
        untrained = {row["name"]: row["value"] for row in probe_rows(card.untrained_metrics or {}, "untrained")}
        rows = [{**row, "untrained": untrained.get(row["name"])} for row in probe_rows(metrics, prefix)]
        rows = rows if step is not None else []
        return render_model_card(
            model_name=card.model_name
            or (repo_id.split("/")[-1] if repo_id else os.path.basename(os.path.abspath(self.args.output_dir))),
            repo_id=repo_id,
            local_dir=local_dir,
            license=card.license,
            objective=self.objective.name,
            objective_title=self.objective.title,
            objective_settings=objective_settings(
                {
                    **self.objective.card_settings(self.args.per_device_train_batch_size * self.args.world_size),
                    **self._batch_selection_settings(),
                }
            ),
            backbone=model.config.backbone,
            feature_dim=model.config.feature_dim,
            includes_projection_head=include_projection_head,
            dataset_name=card.dataset_name,
            hub_dataset_id=card.hub_dataset_id,
            train_split=card.train_split,
            probe_train_split=card.probe_train_split,
            eval_split=card.eval_split,
            eval_split_description=card.eval_split_description,
            train_rows=len(self.train_dataset) if self.train_dataset is not None else None,
            batch_size=self.args.per_device_train_batch_size
            * self.args.gradient_accumulation_steps
            * self.args.world_size,
            steps=self.state.global_step,
            epochs=float(self.state.epoch or 0.0),
            optimizer=(
                f"timm {self.args.timm_optimizer}"
                if self.args.timm_optimizer
                else getattr(self.args.optim, "value", self.args.optim)
            ),
            learning_rate=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            scheduler=getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type),
            image_size=augmentation.image_size,
            mean=list(augmentation.mean),
            std=list(augmentation.std),
            metrics=rows,
            has_baseline=any(row["untrained"] is not None for row in rows),
            eval_step=step,
            shots_per_class=getattr(self.probe_evaluator, "shots_per_class", 5),
            num_draws=getattr(self.probe_evaluator, "num_draws", 10),
            library_version=__version__,
            citations=citations,
        )

    def _batch_selection_settings(self) -> dict[str, Any]:
        """The card's line on how batches were chosen (nothing for the shuffle)."""
        if self.batch_sampler is None:
            return {}
        settings: dict[str, Any] = {"batch_selection": getattr(self.batch_sampler, "name", type(self.batch_sampler))}
        if getattr(self.batch_sampler, "num_candidates", None) is not None:
            settings["batch_selection_candidates"] = self.batch_sampler.num_candidates
        return settings

    def _tokenizer(self) -> Any:
        return (
            self.processing_class
            if self.processing_class is not None
            else getattr(self.data_collator, "tokenizer", None)
        )

    def dual_encoder_card_data(self) -> Any:
        """What a dual encoder's card states: this run's objective, settings and length, and the latest evaluation's
        zero-shot and retrieval numbers beside the untrained model's (``model_card_data.untrained_metrics``)."""
        from ..hub.dual_export import RETRIEVAL_METRICS, DualEncoderCardData

        card = self.model_card_data
        _, prefix, metrics = self.last_evaluation or (None, "eval", {})

        def known(values: dict[str, float], prefix: str) -> dict[str, float]:
            stripped = {key.removeprefix(f"{prefix}_"): value for key, value in values.items()}
            return {key: value for key, value in stripped.items() if key in RETRIEVAL_METRICS}

        transforms = getattr(self.data_collator, "transforms", None)
        global_batch = self.args.per_device_train_batch_size * self.args.world_size
        return DualEncoderCardData(
            dataset_name=card.dataset_name,
            train_split=card.train_split,
            eval_split=card.eval_split,
            license=card.license,
            model_name=card.model_name,
            hub_dataset_id=card.hub_dataset_id,
            objective=self.objective.name,
            objective_config={
                **self.objective.card_settings(global_batch),
                "inverse_temperature": "learned exp(logit_scale), clamped at 100"
                if self.args.learn_logit_scale
                else self.args.inverse_temperature,
            },
            citations=[self.objective.citation],
            batch_size=global_batch * self.args.gradient_accumulation_steps,
            steps=self.state.global_step,
            optimizer=getattr(self.args.optim, "value", self.args.optim),
            learning_rate=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            metrics=known(metrics, prefix),
            untrained_metrics=known(card.untrained_metrics or {}, "untrained") or None,
            evaluation_note=getattr(card, "evaluation_note", None),
            image_size=getattr(transforms, "image_size", None),
            mean=tuple(getattr(transforms, "mean", (0.485, 0.456, 0.406))),
            std=tuple(getattr(transforms, "std", (0.229, 0.224, 0.225))),
        )

    def export(
        self, output_dir: str | None = None, include_projection_head: bool | None = None, repo_id: str | None = None
    ) -> str:
        """Write the backbone (timm + transformers loadable), optionally the head, and the model card.

        Returns the export directory (default ``output_dir/export``).
        """
        output_dir = output_dir or os.path.join(self.args.output_dir, "export")
        if self.image_text:
            if self.args.should_save:
                from ..hub.dual_export import export_dual_encoder

                export_dual_encoder(
                    self.accelerator.unwrap_model(self.model),
                    output_dir,
                    card=self.dual_encoder_card_data(),
                    tokenizer=self._tokenizer(),
                    repo_id=repo_id,
                )
            return output_dir
        if include_projection_head is None:
            include_projection_head = self.args.export_projection_head
        if self.args.should_save:
            augmentation = self.data_collator.augmentation
            export_encoder(
                self.accelerator.unwrap_model(self.model),
                output_dir,
                image_size=augmentation.image_size,
                mean=augmentation.mean,
                std=augmentation.std,
                include_projection_head=include_projection_head,
                model_card=self.model_card(repo_id, include_projection_head, export_dir=output_dir),
            )
        return output_dir

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        include_projection_head: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Upload the export (config, safetensors backbone, model card) to ``args.hub_model_id``.

        Unlike :meth:`transformers.Trainer.push_to_hub`, the raw training checkpoint (optimizer, per-sample state) is
        never uploaded: the repository holds what timm and transformers load.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        export_dir = self.export(
            os.path.join(self.args.output_dir, "hub_export"), include_projection_head, repo_id=self.hub_model_id
        )
        if not self.is_world_process_zero():
            return None
        return HfApi().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=export_dir,
            commit_message=commit_message,
            token=token,
            revision=revision if revision is not None else self.args.hub_revision,
            run_as_future=not blocking,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Training checkpoints stay local; push_to_hub uploads the export at the end.
        return None
