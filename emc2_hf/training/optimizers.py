"""Optimisers from timm (LARS, Adam with L2 decay, ...) with the parameter groups contrastive pre-training uses."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from torch import nn


def decay_parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decayed, exempt)``: weights of ≥ 2 dimensions, and biases and normalisation parameters (≤ 1 dimension)."""
    decayed, exempt = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decayed if parameter.ndim > 1 else exempt).append(parameter)
    return decayed, exempt


def create_timm_optimizer(
    model: nn.Module,
    name: str,
    learning_rate: float,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 1e-3,
) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2(name, ...)`` over two groups: weights, and biases/norm parameters.

    Biases and normalisation parameters get no weight decay. With ``name="lars"`` (timm's ``Lars``) the weights'
    step is ``lr · η ‖w‖ / (‖g‖ + λ‖w‖) · (g + λ w)`` (momentum on top), η = ``trust_coefficient``, even when
    λ = 0; biases and normalisation parameters are not adapted (plain momentum SGD), as in SimCLR/MoCo v3 and the
    EMC² reference code.
    """
    decayed, exempt = decay_parameter_groups(model)
    groups: list[dict] = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": exempt, "weight_decay": 0.0},
    ]
    kwargs = {}
    if name.lower() == "lars":
        groups[0]["always_adapt"] = True
        groups[1]["always_adapt"] = False
        kwargs["trust_coeff"] = trust_coefficient
    groups = [group for group in groups if group["params"]]
    return create_optimizer_v2(
        groups, opt=name, lr=learning_rate, weight_decay=weight_decay, momentum=momentum, **kwargs
    )
