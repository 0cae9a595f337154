"""``batch_norm_act``: F.batch_norm followed by an activation, fused into Triton kernels.

The Triton path is three ``torch.library`` custom ops (``bnbench::bn_act_fwd_train``, ``bnbench::bn_act_fwd_eval``,
``bnbench::bn_act_bwd``) with fake implementations, tied together by one autograd.Function, so torch.compile
traces a model that uses them without a graph break. The ``torch`` backend is :mod:`bnbench.reference`.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

from bnbench.activations import Activation, parse_activation
from bnbench.reference import batch_norm_act_reference

__all__ = ["BACKENDS", "batch_norm_act", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch")


def _kernels():
    """The Triton launchers, imported on first use (importing bnbench must not import triton)."""
    from bnbench import kernels

    return kernels


def _interpreter_active() -> bool:
    if "bnbench.kernels" in sys.modules:  # already built: ask what the kernels were built for
        return _kernels().interpreter_active()
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, input: Tensor) -> str:
    """The backend that runs for this input: "triton" or "torch".

    "auto" picks triton for CUDA tensors and under the Triton interpreter, torch elsewhere. "triton" on a CPU
    tensor without the interpreter is an error, never a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    triton_here = input.device.type == "cuda" or (input.device.type == "cpu" and _interpreter_active())
    if backend == "auto":
        return "triton" if triton_here else "torch"
    if not triton_here:
        raise ValueError(
            f'backend="triton" needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is imported to run '
            f'on CPU; got a tensor on {input.device}. Use backend="torch" or backend="auto" here.'
        )
    return "triton"


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake implementations giving output metadata.
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("bnbench::bn_act_fwd_train", mutates_args=("running_mean", "running_var"))
def _fwd_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    activation: str,
    act_param: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().bn_act_fwd_train(
        x, weight, bias, running_mean, running_var,
        momentum=momentum, eps=eps, activation=activation, act_param=act_param,
    )  # fmt: skip


@_fwd_train.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, activation, act_param):
    stats = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("bnbench::bn_act_fwd_eval", mutates_args=())
def _fwd_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    act_param: float,
) -> Tensor:
    return _kernels().bn_act_fwd_eval(
        x, running_mean, running_var, weight, bias, eps=eps, activation=activation, act_param=act_param
    )


@_fwd_eval.register_fake
def _(x, running_mean, running_var, weight, bias, eps, activation, act_param):
    return torch.empty_like(x)


@torch.library.custom_op("bnbench::bn_act_bwd", mutates_args=())
def _bwd(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd_or_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
    activation: str,
    act_param: float,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = _kernels().bn_act_bwd(
        grad_out, x, mean, rstd_or_var, weight, bias,
        training=training, eps=eps, activation=activation, act_param=act_param,
    )  # fmt: skip
    # custom ops return tensors only: an empty tensor stands for "no parameter"
    return dx, _or_empty(dweight, x), _or_empty(dbias, x)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@_bwd.register_fake
def _(grad_out, x, mean, rstd_or_var, weight, bias, training, eps, activation, act_param):
    grads = [torch.empty_like(p) if p is not None else x.new_empty(0) for p in (weight, bias)]
    return torch.empty_like(x), *grads


class _BatchNormActFunction(torch.autograd.Function):
    """One autograd path for the Triton backend. Saves x, weight, bias and fp32 mean/rstd (training) or the
    running statistics (eval); backward recomputes the pre-activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, activation, act_param):
        if training:
            y, mean, rstd = _fwd_train(x, weight, bias, running_mean, running_var, momentum, eps, activation, act_param)
        else:
            y = _fwd_eval(x, running_mean, running_var, weight, bias, eps, activation, act_param)
            mean, rstd = running_mean, running_var
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.config = (training, eps, activation, act_param)
        return y, mean, rstd

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        training, eps, activation, act_param = ctx.config
        dx, dweight, dbias = _bwd(grad_out, x, mean, rstd, weight, bias, training, eps, activation, act_param)
        return (
            dx,
            dweight if weight is not None else None,
            dbias if bias is not None else None,
            *([None] * 7),
        )


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _check_args(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"expected at least 2-D input (N, C, ...), got shape {tuple(input.shape)}")
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != C:
            raise ValueError(f"input has {C} channels (shape {tuple(input.shape)}) but {name} has {t.numel()}")
    if training:
        if input.numel() // max(C, 1) == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
            )
        if running_mean is not None and not isinstance(momentum, (int, float)):
            raise TypeError(
                f"momentum must be a number when updating running statistics, got {momentum!r} (the modules "
                "turn momentum=None into the cumulative factor 1/num_batches_tracked)"
            )
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be defined in evaluation mode (training=False)")


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | Activation = "relu",
    activation_param: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """``activation(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))``.

    Same arguments and semantics as :func:`torch.nn.functional.batch_norm`, plus the activation (a name or
    :class:`bnbench.Activation`; ``activation_param`` is leaky_relu's negative slope) and the backend
    ("auto", "triton" or "torch"; see :func:`resolve_backend`). Training updates the running statistics in
    place (unbiased variance) with ``momentum``.
    """
    act, param = parse_activation(activation, activation_param)
    _check_args(input, running_mean, running_var, weight, bias, training, momentum)
    if resolve_backend(backend, input) == "torch":
        return batch_norm_act_reference(
            input, running_mean, running_var, weight, bias, training, momentum, eps, act, param
        )
    y, _, _ = _BatchNormActFunction.apply(
        input, weight, bias, running_mean, running_var, bool(training),
        float(momentum) if momentum is not None else 0.0, float(eps), act.value, param,
    )  # fmt: skip
    return y
