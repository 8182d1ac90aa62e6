"""A Trainer callback that runs the probes during and at the end of training."""

from __future__ import annotations

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


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
