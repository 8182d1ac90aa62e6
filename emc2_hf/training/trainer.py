"""``ContrastiveTrainer``: the transformers Trainer with a contrastive objective and its per-sample state."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_functional
from accelerate.utils import broadcast_object_list
from huggingface_hub import HfApi
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.collator import ContrastiveCollator
from ..data.indexed import with_dataset_index
from ..evaluation.callbacks import KNNMonitorCallback, ProbeCallback
from ..evaluation.probes import ProbeEvaluator
from ..hub.export import export_encoder
from ..hub.model_card import OBJECTIVE_TITLES, ModelCardData, objective_settings, probe_rows, render_model_card
from ..objectives import ContrastiveObjective, EMC2Objective, build_objective
from ..sampling.sample_state import load_per_sample_state, save_per_sample_state
from .arguments import ContrastiveTrainingArguments
from .distributed import gather_views, world_size
from .optimizers import create_timm_optimizer


class CollatorEpochCallback(TrainerCallback):
    """Tells the collator the epoch at every epoch start (before the epoch's DataLoader iterator is created)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.collator, "epoch"):
            self.collator.epoch = int(state.epoch or 0)


class ContrastiveTrainer(Trainer):
    """Trains an encoder with EMC², SogCLR or SimCLR, chosen by ``args.objective``.

    A batch travels collator → :meth:`compute_loss` → model (embeddings of the two views) → objective (negative weights
    from its per-sample state) → loss. The objective's per-sample state is written into every checkpoint as
    ``per_sample_state.safetensors`` and restored by ``train(resume_from_checkpoint=...)``. Metrics the objective
    reports (EMC²'s ``acceptance_rate`` and ``outside_batch_sample_fraction``, and ``reencoded_fraction`` in exact
    mode) are averaged over each logging window and logged with the loss, beside ``knn_monitor_accuracy`` when
    ``args.knn_monitor_steps`` is set. With ``args.emc2_exact`` the chain states outside the batch are encoded too
    (:meth:`compute_loss`); with ``args.timm_optimizer`` the optimiser is timm's (:meth:`create_optimizer`). Under
    several processes the objective sees the global batch on every process, and the probes run on the main process.

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
        if objective is None:
            objective = build_objective(
                args.objective,
                num_samples=len(train_dataset),
                inverse_temperature=args.inverse_temperature,
                num_proposals=args.num_proposals,
                burn_in=args.burn_in,
                sogclr_gamma=args.sogclr_gamma,
                seed=args.seed,
                exact=args.emc2_exact,
            )
        elif args.emc2_exact:  # a ready objective: the arguments still decide the exact mode
            if not isinstance(objective, EMC2Objective):
                raise ValueError(f"--emc2_exact needs the emc2 objective, not {type(objective).__name__}")
            objective.exact = True
        if getattr(data_collator, "seed", False) is None:
            data_collator.seed = args.seed  # views keyed by (seed, epoch, index, view): resumable, worker-independent
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
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=data_collator,
            callbacks=callbacks,
            **kwargs,
        )
        self.objective = objective
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
        """Encode both views (``pixel_values: [2b, 3, H, W]``) and evaluate the objective on their embeddings.

        In EMC²'s exact mode (``args.emc2_exact``) the chain states outside the global batch are encoded too, in the
        same forward pass, and passed to the objective as extra candidates (:meth:`_encode_with_chain_states`).
        """
        extra_candidates: dict[str, torch.Tensor] = {}
        if getattr(self.objective, "exact", False):
            outputs, embeddings, extra_candidates = self._encode_with_chain_states(model, inputs)
        else:
            outputs = model(pixel_values=inputs["pixel_values"])
            embeddings = outputs.embeddings
        state = next(self.objective.buffers(), None)
        if state is not None and state.device != embeddings.device:
            self.objective.to(embeddings.device)
        # Every process evaluates the objective on the global batch, so per-sample state stays identical everywhere.
        embeddings, dataset_indices = gather_views(embeddings, inputs[self.data_collator.index_column])
        objective_output = self.objective(
            embeddings,
            dataset_indices,
            step=self.state.global_step,
            micro_step=self._next_micro_step(),
            **extra_candidates,
        )
        for name, value in objective_output.metrics.items():
            self._objective_metrics[name].append(value.detach())
        return (objective_output.loss, outputs) if return_outputs else objective_output.loss

    def _encode_with_chain_states(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """EMC² exact mode: encode the views and the chain states outside the global batch, with autograd.

        Every process lists the same ``k`` states (``objective.states_to_encode`` of the gathered dataset indices),
        encodes its contiguous share of them — their training rows through the collator's ``eval_pixel_values`` —
        in the views' forward pass (so BatchNorm sees ``2b`` views + the share, never a lone image), and all-gathers
        the shares with autograd like :func:`gather_views`: each state has one owner, so its gradient is counted once.

        Returns:
            The model outputs (views' rows), the views' embeddings ``[2b, d]`` and the objective's extra arguments
            ``{"extra_embeddings": [k, d], "extra_dataset_indices": [k]}``, identical on every process.
        """
        pixel_values = inputs["pixel_values"]
        local_indices = inputs[self.data_collator.index_column]
        num_views, size = pixel_values.shape[0], world_size()
        global_indices = local_indices
        if size > 1:
            parts = [torch.empty_like(local_indices) for _ in range(size)]
            dist.all_gather(parts, local_indices)
            global_indices = torch.cat(parts)
        state_indices = self.objective.states_to_encode(global_indices)
        share = -(-state_indices.numel() // size)
        rank = dist.get_rank() if size > 1 else 0
        own = state_indices[rank * share : (rank + 1) * share].tolist()
        if own:
            images = [self.train_dataset[index][self.data_collator.image_column] for index in own]
            state_pixel_values = self.data_collator.eval_pixel_values(images).to(pixel_values)
            pixel_values = torch.cat([pixel_values, state_pixel_values])
        outputs = model(pixel_values=pixel_values)
        own_embeddings = outputs.embeddings[num_views:]
        embeddings = outputs.embeddings[:num_views]
        extra_embeddings = own_embeddings
        if size > 1 and share:
            padding = own_embeddings.new_zeros(share - own_embeddings.shape[0], own_embeddings.shape[1])
            gathered = distributed_functional.all_gather(torch.cat([own_embeddings, padding]))
            extra_embeddings = torch.cat(gathered)[: state_indices.numel()]
        if own and isinstance(outputs, dict):
            for key, value in list(outputs.items()):
                if isinstance(value, torch.Tensor) and value.shape[0] == pixel_values.shape[0]:
                    outputs[key] = value[:num_views]
        return outputs, embeddings, {"extra_embeddings": extra_embeddings, "extra_dataset_indices": state_indices}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._objective_metrics:
            for name, values in self._objective_metrics.items():
                logs[name] = round(torch.stack(values).float().mean().item(), 4)
            self._objective_metrics.clear()
        if "loss" in logs and self._knn_monitor is not None:
            logs.update(self._knn_monitor.pop_pending())
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
        if self.args.world_size > 1:
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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_per_sample_state(self.objective, resume_from_checkpoint)

    # ---- Hub: the export, not the raw training checkpoint, is what gets pushed ----

    def model_card(self, repo_id: str | None = None, include_projection_head: bool | None = None) -> str:
        """The encoder's model card: objective and hyper-parameters, data, training length, probe accuracies.

        ``repo_id`` (else the pushed repository, else ``args.hub_model_id``) is what the card's snippets load; without
        one they load the local export folder and the card says how to push it. The objective's settings are the
        numbers used (e.g. EMC²'s R and P at this run's batch), and the untrained encoder's probes
        (``model_card_data.untrained_metrics``) stand beside the trained ones.
        """
        from .. import __version__

        model = self.accelerator.unwrap_model(self.model)
        augmentation = self.data_collator.augmentation
        card = self.model_card_data
        repo_id = repo_id or self.hub_model_id or self.args.hub_model_id
        local_dir = os.path.join(self.args.output_dir, "export")
        if include_projection_head is None:
            include_projection_head = self.args.export_projection_head
        step, prefix, metrics = self.last_evaluation or (None, "eval", {})
        citations = [self.objective.citation]
        if self.objective.name != "emc2":
            from ..objectives import EMC2Objective

            citations.append(EMC2Objective.citation)
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
            objective_title=OBJECTIVE_TITLES.get(self.objective.name, self.objective.name),
            objective_settings=self._card_objective_settings(),
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

    def _card_objective_settings(self) -> list[tuple[str, Any]]:
        """``(readable name, value)`` of the objective's hyper-parameters as used in this run.

        ``objective.card_settings(batch_size)`` when the objective has it; else its ``get_config_dict()`` with
        defaults that depend on the batch (EMC²'s ``R = 2b − 2`` and ``P = R // 2``) replaced by their values at this
        run's objective batch ``b`` (per-device batch × processes), from the objective's ``sweep_lengths``.
        """
        batch_size = self.args.per_device_train_batch_size * self.args.world_size
        if hasattr(self.objective, "card_settings"):
            settings = self.objective.card_settings(batch_size)
            return objective_settings(settings) if isinstance(settings, dict) else list(settings)
        config = dict(self.objective.get_config_dict())
        if hasattr(self.objective, "sweep_lengths"):
            try:
                num_proposals, burn_in = self.objective.sweep_lengths(2 * batch_size - 2)
            except ValueError:
                return objective_settings(config)
            if "num_proposals" in config and not isinstance(config["num_proposals"], int):
                config["num_proposals"] = f"{num_proposals} (default 2b − 2 at b = {batch_size})"
            if "burn_in" in config and not isinstance(config["burn_in"], int):
                config["burn_in"] = f"{burn_in} (default R // 2)"
        return objective_settings(config)

    def export(
        self, output_dir: str | None = None, include_projection_head: bool | None = None, repo_id: str | None = None
    ) -> str:
        """Write the backbone (timm + transformers loadable), optionally the head, and the model card.

        Returns the export directory (default ``output_dir/export``).
        """
        output_dir = output_dir or os.path.join(self.args.output_dir, "export")
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
                model_card=self.model_card(repo_id, include_projection_head),
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
