"""Exact convergence diagnostics: the global loss (1) and ‖∇L(θ)‖² (4) on a finite dataset of fixed views.

The paper's Fig. 7 tracks both on the first 500 STL-10 images with two pre-computed augmentations each: with the
views fixed, ``D_pos`` and ``D_neg`` are finite, so L(θ) and its full gradient can be evaluated exactly rather than
estimated from a batch. :func:`global_loss_and_gradient` does it in memory linear in the batch of views it embeds at a
time; :class:`GlobalLossCallback` logs both during training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..objectives.global_loss import global_contrastive_loss

logger = logging.getLogger(__name__)

DEFAULT_MAX_VIEWS = 20_000


@dataclass
class GlobalDiagnostics:
    """The exact global loss and its gradient at the current parameters.

    Args:
        loss: ``L(θ)`` of eq. (1).
        gradient_norm_squared: ``‖∇L(θ)‖²`` (eq. (4)), the squared Euclidean norm over all differentiated parameters.
        gradient: ``∇L(θ)``, one tensor per parameter (same shapes and order), when asked for (``return_gradient``).
    """

    loss: float
    gradient_norm_squared: float
    gradient: list[torch.Tensor] | None = None


def check_diagnostics_size(num_images: int, num_views: int, max_views: int = DEFAULT_MAX_VIEWS) -> None:
    """Raise ``ValueError`` if ``num_images · num_views`` views are too many for an exact evaluation.

    Every evaluation compares every view with every other one: ``(m · A)²`` similarities, and two encoder passes over
    all ``m · A`` views.
    """
    total = num_images * num_views
    if total > max_views:
        raise ValueError(
            f"the dataset is too large for exact diagnostics: {num_images} images × {num_views} views = {total} views "
            f"> max_views={max_views}; every evaluation of the global loss (1) computes O((m·A)²) = {total**2:.2e} "
            "similarities and encodes every view twice. Use a subset of the images (the paper's Fig. 7 uses 500) "
            "or raise max_views."
        )


def global_loss_and_gradient(
    model: nn.Module,
    views: torch.Tensor,
    inverse_temperature: float,
    *,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_size: int = 256,
    parameters: Sequence[torch.Tensor] | None = None,
    return_gradient: bool = False,
    max_views: int = DEFAULT_MAX_VIEWS,
) -> GlobalDiagnostics:
    """The exact global contrastive loss (1) over a finite dataset of fixed views, and ``‖∇_θ L(θ)‖²`` of eq. (4).

    ``L(θ) = mean_{i, a ≠ a'} [ −β s(x_i^a, x_i^{a'}) + log Σ_{j ≠ i, c} exp(β s(x_i^a, x_j^c)) ]`` with
    ``s`` the cosine similarity of the embeddings ``f(x; θ)`` (:func:`~emc2_hf.objectives.global_contrastive_loss`).
    Exact, in memory ``O(chunk_size)`` activations:

    1. embed the ``m · A`` views, ``chunk_size`` at a time, without autograd: ``F = [f(x_1^1), …]: [m · A, d]``;
    2. ``L`` and ``G = ∂L/∂F`` by autograd with ``F`` as the leaf;
    3. re-embed chunk by chunk with autograd and accumulate ``∇_θ L = Σ_k (∂f_k/∂θ)ᵀ G_k`` (the chain rule; one
       chunk's graph at a time).

    Step 3 reuses ``G`` from step 1's embeddings, so the model must be deterministic: it is run in ``eval()`` mode
    (no dropout; BatchNorm with its running statistics — in train mode the loss "of the dataset" would depend on
    how it is cut into batches) and every module's previous mode is restored afterwards. A model that still differs
    between the two passes raises ``RuntimeError``. The parameters' ``.grad`` are left untouched
    (``torch.autograd.grad``), so this can run in the middle of training.

    Args:
        model: the encoder; its mode is set and restored, its parameters differentiated.
        views: ``FloatTensor[m, A, C, H, W]``, the pixel values of every fixed view of every image (``A ≥ 2``), or
            ``[m, A, D]`` (any ``[m, A, ...]`` that ``embed`` takes as ``[n, ...]``); moved to the model's device a
            chunk at a time.
        inverse_temperature: ``β``.
        embed: ``views [n, ...] → embeddings [n, d]``; default ``model(pixel_values=x).embeddings``
            (:class:`~emc2_hf.ContrastiveEncoder`); e.g. ``embed=model`` for a plain ``nn.Sequential``.
        chunk_size: views per encoder pass (and anchors per chunk of the loss).
        parameters: the ``θ`` to differentiate (default: every parameter of ``model`` with ``requires_grad``).
        return_gradient: also return ``∇_θ L`` (one tensor per parameter).
        max_views: the largest ``m · A`` accepted (see :func:`check_diagnostics_size`).

    Returns:
        :class:`GlobalDiagnostics` with ``loss``, ``gradient_norm_squared`` and (if asked) ``gradient``.

    Example:

    ```python
    >>> mlp = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 8))
    >>> diagnostics = global_loss_and_gradient(mlp, torch.randn(12, 2, 5), 5.0, embed=mlp)
    >>> diagnostics.loss, diagnostics.gradient_norm_squared
    ```
    """
    if views.ndim < 3 or views.shape[0] < 2 or views.shape[1] < 2:
        raise ValueError(f"views must be [m >= 2 images, A >= 2 views, ...], got {tuple(views.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_images, num_views = views.shape[:2]
    check_diagnostics_size(num_images, num_views, max_views)
    parameters = [p for p in model.parameters() if p.requires_grad] if parameters is None else list(parameters)
    if not parameters:
        raise ValueError("no parameters to differentiate: the model has none with requires_grad (or none were given)")
    if any(not p.requires_grad for p in parameters):
        raise ValueError("every parameter to differentiate needs requires_grad=True")
    if embed is None:

        def embed(batch: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=batch).embeddings

    device = parameters[0].device
    flat_views = views.reshape(num_images * num_views, *views.shape[2:])
    chunks = [(start, flat_views[start : start + chunk_size]) for start in range(0, flat_views.shape[0], chunk_size)]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            features = torch.cat([_embed_chunk(embed, chunk.to(device)) for _, chunk in chunks])
        features = features.to(torch.promote_types(features.dtype, torch.float32))
        with torch.enable_grad():
            leaf = features.detach().requires_grad_(True)
            loss = global_contrastive_loss(leaf.reshape(num_images, num_views, -1), inverse_temperature, chunk_size)
            (feature_gradient,) = torch.autograd.grad(loss, leaf)
            gradient = [torch.zeros_like(p) for p in parameters]
            for start, chunk in chunks:
                chunk_features = _embed_chunk(embed, chunk.to(device))
                _check_deterministic(chunk_features.detach(), features[start : start + chunk.shape[0]])
                partials = torch.autograd.grad(
                    chunk_features,
                    parameters,
                    grad_outputs=feature_gradient[start : start + chunk.shape[0]].to(chunk_features.dtype),
                    allow_unused=True,
                )
                for total, partial in zip(gradient, partials, strict=True):
                    if partial is not None:
                        total.add_(partial)
    finally:
        for module, training in modes.items():
            module.train(training)
    norm_squared = sum(g.double().pow(2).sum() for g in gradient)
    return GlobalDiagnostics(
        loss=loss.item(),
        gradient_norm_squared=float(norm_squared),
        gradient=gradient if return_gradient else None,
    )


def _embed_chunk(embed: Callable[[torch.Tensor], torch.Tensor], chunk: torch.Tensor) -> torch.Tensor:
    embeddings = embed(chunk)
    if embeddings.ndim != 2 or embeddings.shape[0] != chunk.shape[0]:
        raise ValueError(f"embed must map [n, ...] to [n, d]; got {tuple(embeddings.shape)} for n={chunk.shape[0]}")
    return embeddings


def _check_deterministic(again: torch.Tensor, first: torch.Tensor) -> None:
    """Step 3's embeddings must be step 1's, or ∇L would not be the gradient of the reported L."""
    difference = (again.to(first.dtype) - first).abs().max().item()
    if difference > 1e-3 * first.abs().max().item() + 1e-6:
        raise RuntimeError(
            f"the model embedded the same views differently in two passes (max difference {difference:.3g}): exact "
            "diagnostics need a deterministic model in eval() mode (no dropout, stochastic depth or train-mode "
            "BatchNorm that ignores eval())"
        )


def fixed_views(
    images: Sequence[Any], transform_for_view: Callable[[Any, int], torch.Tensor], num_views: int
) -> torch.Tensor:
    """``views[i, a] = transform_for_view(images[i], a)``: the finite dataset of fixed views, ``[m, A, ...]``.

    ``transform_for_view`` must return the same tensor every time for the same ``(image, a)``, e.g. an augmentation
    under a generator seeded by the image's index and ``a``, or ``a`` indexing pre-computed augmentations.
    """
    if num_views < 2:
        raise ValueError(f"num_views must be >= 2 (positives are pairs of distinct views), got {num_views}")
    return torch.stack([torch.stack([transform_for_view(image, a) for a in range(num_views)]) for image in images])


class GlobalLossCallback(TrainerCallback):
    """Logs the exact global loss (1) and ``‖∇L(θ)‖²`` (4) on a fixed finite dataset during training (Fig. 7).

    On the main process, at train begin, at every ``every_n_steps``-th step end and at the last step, it evaluates
    :func:`global_loss_and_gradient` on the trainer's model and appends ``{"step", "global_loss",
    "global_gradient_norm_squared"}`` to :attr:`history`. Step-end values wait in :meth:`pop_pending` and a log is
    requested (``control.should_log``, on every process so the Trainer's loss gathering stays in step), as for
    :class:`KNNMonitorCallback`: the trainer's ``log`` adds them to that step's logs. The Trainer logs nothing at
    train begin (or after a stop before ``max_steps``), so those values go to ``state.log_history`` directly.

    If ``m · A`` exceeds ``max_views`` (see :func:`check_diagnostics_size`), it logs one warning and does nothing.

    Args:
        views: ``FloatTensor[m, A, ...]``, the fixed views (:func:`fixed_views`); kept where they are, moved to the
            model's device a chunk at a time.
        every_n_steps: the period, in optimisation steps.
        inverse_temperature: ``β`` of the loss (default: the training arguments' ``inverse_temperature``).
        embed: ``(model, views [n, ...]) → embeddings [n, d]``; default ``model(pixel_values=x).embeddings``.
        chunk_size: views per encoder pass.
        max_views: the largest ``m · A`` evaluated.
    """

    loss_name = "global_loss"
    gradient_name = "global_gradient_norm_squared"

    def __init__(
        self,
        views: torch.Tensor,
        every_n_steps: int,
        inverse_temperature: float | None = None,
        embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        chunk_size: int = 256,
        max_views: int = DEFAULT_MAX_VIEWS,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if views.ndim < 3:
            raise ValueError(f"views must be [m, A, ...], got {tuple(views.shape)}")
        self.views = views
        self.every_n_steps = every_n_steps
        self.inverse_temperature = inverse_temperature
        self.embed = embed
        self.chunk_size = chunk_size
        self.max_views = max_views
        self.history: list[dict[str, float]] = []
        """``{"step", "global_loss", "global_gradient_norm_squared"}`` of every evaluation, in order."""
        self.pending: dict[str, float] = {}
        self.disabled = False
        self._last_step: int | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs
    ) -> TrainerControl:
        if self._enabled(state) and model is not None and state.is_world_process_zero:
            self._write_to_log_history(state, self._measure(args, state, model))
        return control

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs
    ) -> TrainerControl:
        due = state.global_step % self.every_n_steps == 0 or state.global_step == state.max_steps
        if due and model is not None and self._enabled(state):
            if state.is_world_process_zero:
                self.pending = self._measure(args, state, model)
            control.should_log = True
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs
    ) -> TrainerControl:
        if self._enabled(state) and model is not None and state.is_world_process_zero:
            self._write_to_log_history(state, self._measure(args, state, model))  # stopped before the last step
        return control

    def pop_pending(self) -> dict[str, float]:
        """The metrics measured since the last log (and forget them)."""
        pending, self.pending = self.pending, {}
        return pending

    def _enabled(self, state: TrainerState) -> bool:
        if not self.disabled:
            try:
                check_diagnostics_size(self.views.shape[0], self.views.shape[1], self.max_views)
            except ValueError as error:
                self.disabled = True
                if state.is_world_process_zero:
                    logger.warning("GlobalLossCallback disabled: %s", error)
        return not self.disabled

    def _measure(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> dict[str, float]:
        """Evaluate at ``state.global_step`` (once per step) and record it; ``{}`` if already done at this step."""
        if self._last_step == state.global_step:
            return {}
        encoder = getattr(model, "module", model)  # DistributedDataParallel wraps the encoder
        inverse_temperature = self.inverse_temperature
        if inverse_temperature is None:
            inverse_temperature = getattr(args, "inverse_temperature", None)
            if inverse_temperature is None:
                raise ValueError("GlobalLossCallback needs inverse_temperature= (the training arguments have none)")
        embed = None if self.embed is None else (lambda batch: self.embed(encoder, batch))
        diagnostics = global_loss_and_gradient(
            encoder,
            self.views,
            inverse_temperature,
            embed=embed,
            chunk_size=self.chunk_size,
            max_views=self.max_views,
        )
        self._last_step = state.global_step
        values = {self.loss_name: diagnostics.loss, self.gradient_name: diagnostics.gradient_norm_squared}
        self.history.append({"step": state.global_step, **values})
        return values

    def _write_to_log_history(self, state: TrainerState, values: dict[str, float]) -> None:
        logged = any(e.get("step") == state.global_step and self.loss_name in e for e in state.log_history)
        if values and not logged:
            state.log_history.append({**values, "step": state.global_step})
