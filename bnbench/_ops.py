"""The Triton path as ``torch.library`` custom ops with fake implementations, so torch.compile traces it.

Four ops, one per launcher of :mod:`bnbench.kernels`: ``bnbench::bn_act_fwd_train`` (mutates the running
statistics), ``bnbench::bn_act_fwd_eval``, ``bnbench::bn_act_bwd`` and ``bnbench::bn_act_bwd_from_output``
(memory-saving mode). The fake implementations give torch.compile the outputs' metadata without running a
kernel. Callers use :func:`fwd_train`, :func:`fwd_eval`, :func:`bwd` and :func:`bwd_from_output`, which go
through the dispatcher only while torch.compile traces (an opaque node); in eager mode they call the launcher
directly, since the dispatcher would only add host overhead (tens of microseconds a call, as much as a small
input's whole kernel time). ``bnbench.kernels`` (and so triton) is imported on the first call.

The training and eval forwards and the backward from x take an optional ``residual`` (y = act(BN(x) + residual));
the backward then returns its gradient as a fourth tensor (an empty one without a residual).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnbench.reference import MEMORY_SAVING_MIN_ABS_WEIGHT

__all__ = ["bwd", "bwd_from_output", "fwd_eval", "fwd_train"]


def _fwd_train_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    activation: str,
    act_param: float,
    residual: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    from bnbench import kernels

    return kernels.bn_act_fwd_train(
        x, weight, bias, running_mean, running_var,
        momentum=momentum, eps=eps, activation=activation, act_param=act_param, residual=residual,
    )  # fmt: skip


_fwd_train = torch.library.custom_op("bnbench::bn_act_fwd_train", mutates_args=("running_mean", "running_var"))(
    _fwd_train_impl
)


@_fwd_train.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, activation, act_param, residual):
    stats = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fwd_eval_impl(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    act_param: float,
    residual: Tensor | None,
) -> Tensor:
    from bnbench import kernels

    return kernels.bn_act_fwd_eval(
        x, running_mean, running_var, weight, bias, eps=eps, activation=activation, act_param=act_param,
        residual=residual,
    )  # fmt: skip


_fwd_eval = torch.library.custom_op("bnbench::bn_act_fwd_eval", mutates_args=())(_fwd_eval_impl)


@_fwd_eval.register_fake
def _(x, running_mean, running_var, weight, bias, eps, activation, act_param, residual):
    return torch.empty_like(x)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """Custom ops return tensors only: an empty tensor stands for "no parameter"."""
    return like.new_empty(0) if t is None else t


def _fake_grads(like: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Output metadata of the backward ops: (grad like ``like``, dweight, dbias), empty for a missing parameter."""
    grads = (None if p is None else torch.empty_like(p) for p in (weight, bias))
    return torch.empty_like(like), *(_or_empty(g, like) for g in grads)


def _bwd_impl(
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
    residual: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from bnbench import kernels

    dx, dweight, dbias, *dresidual = kernels.bn_act_bwd(
        grad_out, x, mean, rstd_or_var, weight, bias,
        training=training, eps=eps, activation=activation, act_param=act_param, residual=residual,
    )  # fmt: skip
    return dx, _or_empty(dweight, x), _or_empty(dbias, x), dresidual[0] if dresidual else x.new_empty(0)


_bwd = torch.library.custom_op("bnbench::bn_act_bwd", mutates_args=())(_bwd_impl)


@_bwd.register_fake
def _(grad_out, x, mean, rstd_or_var, weight, bias, training, eps, activation, act_param, residual):
    return *_fake_grads(x, weight, bias), x.new_empty(0) if residual is None else torch.empty_like(residual)


def _bwd_from_output_impl(
    grad_out: Tensor,
    y: Tensor,
    rstd_or_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
    activation: str,
    act_param: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from bnbench import kernels

    dx, dweight, dbias = kernels.bn_act_bwd_from_output(
        grad_out, y, rstd_or_var, weight, bias, training=training, eps=eps, activation=activation,
        act_param=act_param, min_abs_weight=MEMORY_SAVING_MIN_ABS_WEIGHT,
    )  # fmt: skip
    return dx, _or_empty(dweight, y), _or_empty(dbias, y)


_bwd_from_output = torch.library.custom_op("bnbench::bn_act_bwd_from_output", mutates_args=())(_bwd_from_output_impl)


@_bwd_from_output.register_fake
def _(grad_out, y, rstd_or_var, weight, bias, training, eps, activation, act_param):
    return _fake_grads(y, weight, bias)


def _op(op, impl):
    """The custom op while torch.compile traces (an opaque node with a fake implementation), the plain
    implementation in eager mode."""
    return op if torch.compiler.is_compiling() else impl


def fwd_train(*args) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) = fwd_train(x, weight, bias, running_mean, running_var, momentum, eps, activation,
    act_param, residual); updates the running statistics in place."""
    return _op(_fwd_train, _fwd_train_impl)(*args)


def fwd_eval(*args) -> Tensor:
    """y = fwd_eval(x, running_mean, running_var, weight, bias, eps, activation, act_param, residual)."""
    return _op(_fwd_eval, _fwd_eval_impl)(*args)


def bwd(*args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual) = bwd(grad_out, x, mean, rstd_or_var, weight, bias, training, eps,
    activation, act_param, residual); dweight/dbias/dresidual are empty tensors for a missing parameter or
    residual."""
    return _op(_bwd, _bwd_impl)(*args)


def bwd_from_output(*args) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) = bwd_from_output(grad_out, y, rstd_or_var, weight, bias, training, eps, activation,
    act_param), the memory-saving backward; dweight/dbias are empty tensors for a missing parameter."""
    return _op(_bwd_from_output, _bwd_from_output_impl)(*args)
