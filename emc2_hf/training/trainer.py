"""``ContrastiveTrainer``: the transformers Trainer with a contrastive objective and its per-sample state."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.collator import ContrastiveCollator
from ..data.indexed import with_dataset_index
from ..evaluation.callbacks import ProbeCallback
from ..evaluation.probes import ProbeEvaluator
from ..objectives import ContrastiveObjective, build_objective
from ..sampling.sample_state import load_per_sample_state, save_per_sample_state
from .arguments import ContrastiveTrainingArguments
from .distributed import gather_views


class ContrastiveTrainer(Trainer):
    """Trains an encoder with EMC², SogCLR or SimCLR, chosen by ``args.objective``.

    A batch travels collator → :meth:`compute_loss` → model (embeddings of the two views) → objective (negative weights
    from its per-sample state) → loss. The objective's per-sample state is written into every checkpoint as
    ``per_sample_state.safetensors`` and restored by ``train(resume_from_checkpoint=...)``. Metrics the objective
    reports (EMC²'s ``acceptance_rate`` and ``outside_batch_sample_fraction``) are averaged over each logging window
    and logged with the loss.

    Args:
        model: a model whose forward takes ``pixel_values`` and returns ``embeddings`` (and ``features`` for the
            probes),
            e.g. :class:`~emc2_hf.ContrastiveEncoder`.
        args: :class:`ContrastiveTrainingArguments`.
        train_dataset: map-style dataset of rows with an image column; the dataset index column is added if missing.
        data_collator: a :class:`~emc2_hf.ContrastiveCollator` (default one if omitted).
        probe_evaluator: a :class:`~emc2_hf.ProbeEvaluator`; if given, :meth:`evaluate` reports linear-probe, 1-NN and
            few-shot accuracies, and they also run at the end of training (and every ``eval_steps`` with
            ``eval_strategy="steps"``).
        objective: a ready objective, overriding the one ``args`` describe.
        **kwargs: passed to :class:`transformers.Trainer`.
    """

    def __init__(
        self,
        model: nn.Module,
        args: ContrastiveTrainingArguments,
        train_dataset: Any,
        data_collator: ContrastiveCollator | None = None,
        probe_evaluator: ProbeEvaluator | None = None,
        objective: ContrastiveObjective | None = None,
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
            )
        callbacks = list(callbacks or [])
        if probe_evaluator is not None and not any(isinstance(callback, ProbeCallback) for callback in callbacks):
            callbacks.append(ProbeCallback())
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
        """Encode both views (``pixel_values: [2b, 3, H, W]``) and evaluate the objective on their embeddings."""
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
        )
        for name, value in objective_output.metrics.items():
            self._objective_metrics[name].append(value.detach())
        return (objective_output.loss, outputs) if return_outputs else objective_output.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._objective_metrics:
            for name, values in self._objective_metrics.items():
                logs[name] = round(torch.stack(values).float().mean().item(), 4)
            self._objective_metrics.clear()
        super().log(logs, start_time)

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
        metrics = {
            f"{metric_key_prefix}_{name}": value
            for name, value in self.probe_evaluator(model, device=self.args.device).items()
        }
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
