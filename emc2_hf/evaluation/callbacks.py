"""A Trainer callback that runs the probes during and at the end of training."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .probes import ProbeEvaluator


class ProbeCallback(TrainerCallback):
    """Asks the Trainer to evaluate every ``eval_steps`` steps and at the last step.

    :class:`~emc2_hf.ContrastiveTrainer`'s ``evaluate()`` runs its :class:`~emc2_hf.ProbeEvaluator`, so triggering
    evaluation is how the probes run mid-training; their accuracies reach the Trainer's loggers (``report_to``)
    through ``Trainer.log``. The ContrastiveTrainer adds this callback when it has a probe evaluator.

    Args:
        eval_steps: evaluate every this many steps (``None``: only at the end).
    """

    def __init__(self, eval_steps: int | None = None) -> None:
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1 or None, got {eval_steps}")
        self.eval_steps = eval_steps

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> TrainerControl:
        periodic = self.eval_steps is not None and state.global_step % self.eval_steps == 0
        if periodic or state.global_step == state.max_steps:
            control.should_evaluate = True
        return control


class KNNMonitorCallback(TrainerCallback):
    """Measures the 1-NN accuracy of the backbone features every ``every_n_steps`` steps, for the training logs.

    On the main process only, at every ``every_n_steps``-th step end, it computes :meth:`ProbeEvaluator.knn` and
    requests a log; :class:`~emc2_hf.ContrastiveTrainer` adds the value to that step's logs as
    ``knn_monitor_accuracy``, so it reaches ``report_to`` loggers and ``state.log_history`` beside the loss.

    Args:
        evaluator: the labelled splits and transform to measure on.
        every_n_steps: the period, in optimisation steps.
    """

    metric_name = "knn_monitor_accuracy"

    def __init__(self, evaluator: ProbeEvaluator, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.evaluator = evaluator
        self.every_n_steps = every_n_steps
        self.pending: dict[str, float] = {}

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs
    ) -> TrainerControl:
        if state.global_step % self.every_n_steps == 0 and model is not None:
            if state.is_world_process_zero:
                encoder = getattr(model, "module", model)  # DistributedDataParallel wraps the encoder
                self.pending[self.metric_name] = round(self.evaluator.knn(encoder, device=args.device), 4)
            control.should_log = True
        return control

    def pop_pending(self) -> dict[str, float]:
        """The metrics measured since the last log (and forget them)."""
        pending, self.pending = self.pending, {}
        return pending
