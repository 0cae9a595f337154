"""The plain PyTorch composition ``F.batch_norm`` then the activation.

One source of truth for the math: the tests' float64 reference, the benchmark's ``eager`` provider and the
``backend="torch"`` path of :func:`bnbench.batch_norm_act` all call this function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bnbench.activations import Activation, apply_activation


def batch_norm_act_reference(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: Activation = Activation.RELU,
    activation_param: float = 0.0,
) -> torch.Tensor:
    """``activation(F.batch_norm(input, ...))``; updates the running statistics in place when training."""
    z = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return apply_activation(z, activation, activation_param)
