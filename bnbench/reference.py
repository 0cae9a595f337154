"""The plain PyTorch composition ``F.batch_norm``, the residual add (when given), then the activation.

One source of truth for the math: the tests' float64 reference, the benchmark's ``eager`` provider and the
``backend="torch"`` path of :func:`bnbench.batch_norm_act` all call this function. Also the memory-saving
backward from the output (:func:`bwd_from_output_reference`), which the ``torch`` backend runs in that mode.
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
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``activation(F.batch_norm(input, ...) + residual)`` (no add without a residual); updates the running
    statistics in place when training."""
    z = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        z = z + residual
    return apply_activation(z, activation, activation_param)


#: the memory-saving backward divides by gamma; |gamma| is floored here (x_hat is unrecoverable where gamma == 0)
MEMORY_SAVING_MIN_ABS_WEIGHT = 1e-5


def bwd_from_output_reference(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    activation: Activation,
    act_param: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight, dbias) of y = act(BN(x)) from the output y, in fp32 PyTorch ops (memory-saving mode).

    ``rstd`` is the batch rstd (training) or 1/sqrt(running_var + eps) (eval). The normalised input is rebuilt
    as x_hat = (act^-1(y) - b) / w with |w| floored at ``MEMORY_SAVING_MIN_ABS_WEIGHT``; identity and leaky_relu
    with a positive slope only. The same math as the SAVED_OUTPUT kernels of ``kernels/_backward.py``.
    """
    C = y.shape[1]
    shape = (1, C) + (1,) * (y.dim() - 2)
    dims = [0, *range(2, y.dim())]
    yf, dy = y.float(), grad_out.float()
    w = weight.float() if weight is not None else yf.new_ones(C)
    b = bias.float() if bias is not None else yf.new_zeros(C)
    if activation is Activation.IDENTITY:
        z, dz = yf, dy
    else:  # leaky_relu with a positive slope (bnbench.functional.memory_saving_unsupported rules out the rest)
        z = torch.where(yf > 0, yf, yf / act_param)
        dz = torch.where(z > 0, dy, dy * act_param)
    inv_w = torch.where(w < 0, -1.0, 1.0) / w.abs().clamp_min(MEMORY_SAVING_MIN_ABS_WEIGHT)
    x_hat = (z - b.view(shape)) * inv_w.view(shape)
    sum_dz, sum_dz_xhat = dz.sum(dims), (dz * x_hat).sum(dims)
    scale = (w * rstd).view(shape)
    if training:
        total = y.numel() // C
        dx = scale * (dz - (sum_dz / total).view(shape) - x_hat * (sum_dz_xhat / total).view(shape))
    else:
        dx = scale * dz
    dweight = sum_dz_xhat.to(weight.dtype) if weight is not None else None
    dbias = sum_dz.to(bias.dtype) if bias is not None else None
    return dx.to(y.dtype), dweight, dbias
