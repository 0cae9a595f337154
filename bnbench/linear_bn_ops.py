"""The Triton path of :mod:`bnbench.linear_bn` as ``torch.library`` custom ops, so torch.compile traces a model that
uses the fused layers (each op is an opaque node with a fake implementation giving its outputs' metadata).

Every op takes the matmul input ``x`` as the layers pass it ([M, K], or the [B, K, H, W] rows of a 1x1 conv,
possibly a strided view) and returns fresh tensors: Y and Z as contiguous [M, N] matrices (the caller views them
as [B, N, H, W] channels_last), dX as [M, K]. An absent gradient or parameter is an empty tensor.

- ``bnbench::matmul_bn_act_fwd_train`` (mutates the running statistics): (y, z, mean, rstd);
- ``bnbench::matmul_bn_act_fwd_eval``: (y, z), Z kept for the backward;
- ``bnbench::matmul_bn_act_infer``: y (BatchNorm + activation in the matmul's epilogue);
- ``bnbench::matmul_bn_act_bwd``: (dx, dw, dgamma, dbeta): fused BatchNorm + activation backward on Z, then
  dX = dZ @ W and dW = dZ^T @ X (torch.matmul inside the op).

In eager mode the plain implementations run (the dispatcher would only add host time).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bwd", "fwd_eval", "fwd_train", "infer", "rows_2d"]


def _gemm():
    from bnbench.kernels import gemm_launchers

    return gemm_launchers


def _rows(x: Tensor) -> int:
    return x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[2] * x.shape[3]


def rows_2d(t: Tensor) -> Tensor:
    """A [B, C, H, W] tensor as its [B*H*W, C] matrix of rows (a view for channels_last, else a copy)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _op(op, impl):
    return op if torch.compiler.is_compiling() else impl


def _empty_or(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


# --- forward ------------------------------------------------------------------------------------------------------


def _fwd_train_impl(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    activation: str,
    act_param: float,
    input_precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _gemm().linear_bn_act_fwd_train(
        x, weight, bn_weight, bn_bias, running_mean, running_var, momentum=momentum, eps=eps,
        activation=activation, act_param=act_param, input_precision=input_precision,
    )  # fmt: skip


_fwd_train = torch.library.custom_op("bnbench::matmul_bn_act_fwd_train", mutates_args=("running_mean", "running_var"))(
    _fwd_train_impl
)


@_fwd_train.register_fake
def _(x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps, activation, act_param, input_precision):
    M, N = _rows(x), weight.shape[0]
    stats = x.new_empty(N, dtype=torch.float32)
    return x.new_empty((M, N)), x.new_empty((M, N)), stats, torch.empty_like(stats)


def _fwd_eval_impl(
    x: Tensor,
    weight: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
    activation: str,
    act_param: float,
    input_precision: str,
) -> tuple[Tensor, Tensor]:
    return _gemm().linear_bn_act_fwd_eval(
        x, weight, running_mean, running_var, bn_weight, bn_bias, eps=eps, activation=activation,
        act_param=act_param, input_precision=input_precision,
    )  # fmt: skip


_fwd_eval = torch.library.custom_op("bnbench::matmul_bn_act_fwd_eval", mutates_args=())(_fwd_eval_impl)


@_fwd_eval.register_fake
def _(x, weight, running_mean, running_var, bn_weight, bn_bias, eps, activation, act_param, input_precision):
    M, N = _rows(x), weight.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, N))


def _infer_impl(
    x: Tensor,
    weight: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
    activation: str,
    act_param: float,
    input_precision: str,
) -> Tensor:
    return _gemm().linear_bn_act_infer(
        x, weight, running_mean, running_var, bn_weight, bn_bias, eps=eps, activation=activation,
        act_param=act_param, input_precision=input_precision,
    )  # fmt: skip


_infer = torch.library.custom_op("bnbench::matmul_bn_act_infer", mutates_args=())(_infer_impl)


@_infer.register_fake
def _(x, weight, running_mean, running_var, bn_weight, bn_bias, eps, activation, act_param, input_precision):
    return x.new_empty((_rows(x), weight.shape[0]))


# --- backward -----------------------------------------------------------------------------------------------------


def _bwd_impl(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    z: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    training: bool,
    eps: float,
    activation: str,
    act_param: float,
    need_dx: bool,
    need_dw: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from bnbench.kernels import launchers

    if x.dim() == 4:  # Z's rows as [B, N, H, W] (a channels_last view), the shape of grad_out
        B, _, H, W = x.shape
        z = z.view(B, H, W, -1).permute(0, 3, 1, 2)
    dz, dgamma, dbeta = launchers.bn_act_bwd(
        grad_out, z, mean, rstd, bn_weight, bn_bias, training=training, eps=eps, activation=activation,
        act_param=act_param,
    )  # fmt: skip
    dz2 = dz if dz.dim() == 2 else rows_2d(dz)  # dz is allocated like z: a view
    dx = dz2 @ weight if need_dx else x.new_empty(0)
    dw = dz2.t() @ (x if x.dim() == 2 else rows_2d(x)) if need_dw else x.new_empty(0)
    return dx, dw, _empty_or(dgamma, x), _empty_or(dbeta, x)


_bwd = torch.library.custom_op("bnbench::matmul_bn_act_bwd", mutates_args=())(_bwd_impl)


@_bwd.register_fake
def _(grad_out, x, weight, z, bn_weight, bn_bias, mean, rstd, training, eps, activation, act_param, need_dx, need_dw):
    M, K = _rows(x), x.shape[1]
    dx = x.new_empty((M, K)) if need_dx else x.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else x.new_empty(0)
    grads = (x.new_empty(0) if p is None else torch.empty_like(p) for p in (bn_weight, bn_bias))
    return dx, dw, *grads


def fwd_train(*args):
    return _op(_fwd_train, _fwd_train_impl)(*args)


def fwd_eval(*args):
    return _op(_fwd_eval, _fwd_eval_impl)(*args)


def infer(*args):
    return _op(_infer, _infer_impl)(*args)


def bwd(*args):
    return _op(_bwd, _bwd_impl)(*args)
