"""A Trainer callback that runs the probes during and at the end of training."""

from __future__ import annotations

import time
from typing import Any

import torch
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
    requests a log; :class:`~emc2_hf.ContrastiveTrainer` adds the values to that step's logs, so they reach
    ``report_to`` loggers and ``state.log_history`` beside the loss:

    * ``knn_monitor_accuracy``: the 1-NN accuracy;
    * ``knn_monitor_train_seconds``: seconds of training up to this step — the wall time since ``on_train_begin``
      less the time spent in this monitor's measurements, in the Trainer's evaluations during training (e.g. the
      probes of ``eval_strategy="steps"``) and in checkpoint saves; a resumed run continues from the last value it
      logged. The untrained probes run before ``train()`` and are not counted either;
    * ``knn_monitor_samples``: images seen, ``global_step × per_device_train_batch_size × world_size ×
      gradient_accumulation_steps``.

    There is no measurement at step 0: a value taken in ``on_train_begin`` would reach the logs only with the first
    loss log (a later step) and be replaced by that step's own measurement; the untrained encoder's 1-NN accuracy is
    the recipes' ``untrained_knn_accuracy`` (on the full evaluation split). Curves start at the first monitor step.

    Args:
        evaluator: the labelled splits and transform to measure on.
        every_n_steps: the period, in optimisation steps.
    """

    metric_name = "knn_monitor_accuracy"
    seconds_name = "knn_monitor_train_seconds"
    samples_name = "knn_monitor_samples"

    def __init__(self, evaluator: ProbeEvaluator, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.evaluator = evaluator
        self.every_n_steps = every_n_steps
        self.pending: dict[str, float] = {}
        self._start: float | None = None  # perf_counter() at train begin; None outside train()
        self._mark = 0.0  # the end of the last stretch of training (a step end or a training log)
        self._paused = 0.0  # seconds since train begin spent measuring, evaluating and saving
        self._resumed_seconds = 0.0  # training seconds logged before a resume

    def train_seconds(self, now: float | None = None) -> float:
        """Seconds of training so far (0 outside ``train()``): see the class docstring."""
        if self._start is None:
            return 0.0
        now = time.perf_counter() if now is None else now
        return self._resumed_seconds + now - self._start - self._paused

    @staticmethod
    def images_seen(args: TrainingArguments, state: TrainerState) -> int:
        """``global_step × per_device_train_batch_size × world_size × gradient_accumulation_steps``."""
        per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        return state.global_step * per_step

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> TrainerControl:
        self._start = self._mark = time.perf_counter()
        self._paused = 0.0
        logged = [log[self.seconds_name] for log in state.log_history if self.seconds_name in log]
        self._resumed_seconds = float(logged[-1]) if state.global_step > 0 and logged else 0.0
        return control

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs
    ) -> TrainerControl:
        now = time.perf_counter()
        if state.global_step % self.every_n_steps == 0 and model is not None:
            if state.is_world_process_zero:
                if args.device.type == "cuda":
                    torch.cuda.synchronize(args.device)  # the step's kernels are training time, not monitoring
                    now = time.perf_counter()
                seconds = self.train_seconds(now)
                encoder = getattr(model, "module", model)  # DistributedDataParallel wraps the encoder
                self.pending[self.metric_name] = round(self.evaluator.knn(encoder, device=args.device), 4)
                self.pending[self.seconds_name] = round(seconds, 3)
                self.pending[self.samples_name] = self.images_seen(args, state)
                after = time.perf_counter()
                self._paused += after - now
                now = after
            control.should_log = True
        self._mark = now
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs,
    ) -> TrainerControl:
        if logs is not None and "loss" in logs:
            self._mark = time.perf_counter()  # logging the loss is part of training; an evaluation starts after it
        return control

    def _pause(self) -> None:
        """Count the time since the last stretch of training as not training."""
        if self._start is not None:
            now = time.perf_counter()
            self._paused += now - self._mark
            self._mark = now

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> TrainerControl:
        self._pause()
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> TrainerControl:
        self._pause()
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> TrainerControl:
        self._start = None
        return control

    def pop_pending(self) -> dict[str, float]:
        """The metrics measured since the last log (and forget them)."""
        pending, self.pending = self.pending, {}
        return pending
