"""Linear / 1x1 convolution + BatchNorm + activation, with BatchNorm's statistics taken in the matmul's epilogue.

``linear_batch_norm_act(x, weight, ...)`` is ``act(F.batch_norm(F.linear(x, weight), ...))`` and
``conv1x1_batch_norm_act(x, weight, ..., stride=s)`` is ``act(F.batch_norm(F.conv2d(x, weight, stride=s), ...))``
for a 1x1 kernel with no padding. The ``triton`` backend runs one matmul kernel that writes Z and per-tile
partial statistics, the BatchNorm combine and the normalise + activation kernel (3T of Z/Y traffic instead of
torch.compile's 4T and eager's 6T); its backward runs the fused BatchNorm + activation backward on Z, then
dX = dZ @ W and dW = dZ^T @ X with ``torch.matmul``. In evaluation mode with no gradient wanted (inference),
BatchNorm and the activation run in the matmul's epilogue with the running statistics: one launch, and Z is
never written. The ``torch`` backend is that module chain in PyTorch.

A 1x1 convolution is a matmul over the rows (n, h, w) of its input: a channels_last input is read in place, a
stride s is the strided view ``x[:, :, ::s, ::s]`` (no copy), and an NCHW input is read through its strides
(correct; its channel axis is not the unit-stride one, so it is slower). The output is channels_last. The one
copy on this path: for stride > 1, the backward's dW = dZ^T @ X gathers the strided rows of X for
``torch.matmul`` (a quarter of the input at stride 2).

Under ``torch.autocast`` the matmul's operands are cast to the autocast dtype, as autocast does for
``F.linear``/``F.conv2d``. fp32 inputs are multiplied exactly by default (``input_precision="ieee"``, what
``nn.Linear`` does with PyTorch's default ``allow_tf32=False``); ``input_precision="tf32"`` selects the tensor
cores. The backward's ``torch.matmul`` follows ``torch.backends.cuda.matmul.allow_tf32``, as the module chain
does. The Triton path is the torch.library ops of :mod:`bnbench.linear_bn_ops` (torch.compile traces them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bnbench import linear_bn_ops as ops
from bnbench.activations import Activation, parse_activation
from bnbench.functional import BACKENDS, resolve_backend
from bnbench.reference import batch_norm_act_reference

__all__ = ["INPUT_PRECISIONS", "conv1x1_batch_norm_act", "linear_batch_norm_act"]

INPUT_PRECISIONS = ("ieee", "tf32")


class _MatmulBatchNormActFunction(torch.autograd.Function):
    """Triton forward, fused BN + activation backward on Z, then the two matmuls (the ops of
    :mod:`bnbench.linear_bn_ops`). ``x`` is the matmul's input: [M, K], or [B, K, H, W] (the rows (n, h, w) of a
    1x1 convolution, already strided); ``weight`` is [N, K]."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, activation,
                act_param, input_precision):  # fmt: skip
        if training:
            y, z, mean, rstd = ops.fwd_train(
                x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps, activation, act_param,
                input_precision,
            )  # fmt: skip
        else:
            y, z = ops.fwd_eval(
                x, weight, running_mean, running_var, bn_weight, bn_bias, eps, activation, act_param, input_precision
            )
            mean, rstd = running_mean, running_var
        ctx.save_for_backward(x, weight, z, bn_weight, bn_bias, mean, rstd)
        ctx.config = (training, eps, activation, act_param)
        return _as_output(y, x)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, z, bn_weight, bn_bias, mean, rstd = ctx.saved_tensors
        training, eps, activation, act_param = ctx.config
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx, dw, dgamma, dbeta = ops.bwd(
            grad_out, x, weight, z, bn_weight, bn_bias, mean, rstd, training, eps, activation, act_param, need_dx,
            need_dw,
        )  # fmt: skip
        return (
            _as_output(dx, x) if need_dx else None,
            dw if need_dw else None,
            dgamma if bn_weight is not None else None,
            dbeta if bn_bias is not None else None,
            *([None] * 8),
        )


def _as_output(rows: Tensor, x: Tensor) -> Tensor:
    """[M, C] rows as the layer's output shape: themselves for a Linear; [B, C, H, W] channels_last (a view)."""
    if x.dim() == 2:
        return rows
    B, _, H, W = x.shape
    return rows.view(B, H, W, -1).permute(0, 3, 1, 2)


def _check(
    input: Tensor,
    weight: Tensor,
    tensors: dict[str, Tensor | None],
    training: bool,
    momentum,
    input_dim: int,
    what: str,
) -> None:
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if input.dim() != input_dim:
        raise ValueError(f"{what} expects a {input_dim}-D input, got shape {tuple(input.shape)}")
    if weight.shape[1:2] != input.shape[1:2]:
        raise ValueError(
            f"weight {tuple(weight.shape)} expects {weight.shape[1]} input features, got input of shape "
            f"{tuple(input.shape)}"
        )
    N = weight.shape[0]
    for name, t in tensors.items():
        if t is not None and (t.dim() != 1 or t.numel() != N):
            raise ValueError(f"weight has {N} output features but {name} has shape {tuple(t.shape)}")
    if training and tensors["running_mean"] is not None:
        ok = (isinstance(momentum, (int, float)) and not isinstance(momentum, bool)) or (
            isinstance(momentum, Tensor) and momentum.dim() == 0 and momentum.is_floating_point()
        )
        if not ok:
            raise TypeError(f"momentum must be a number or a 0-dim floating-point tensor, got {momentum!r}")
    elif not training and (tensors["running_mean"] is None or tensors["running_var"] is None):
        raise ValueError("running_mean and running_var must be defined in evaluation mode (training=False)")


def _run(matmul_input, weight2d, torch_z, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
         act, param, use_triton, input_precision):  # fmt: skip
    """One backend with a float momentum. ``torch_z()`` is the torch backend's matmul (F.linear / F.conv2d)."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (matmul_input, weight2d, bn_weight, bn_bias)
    )
    if use_triton and not training and not wants_grad:  # inference: BatchNorm in the matmul's epilogue
        y = ops.infer(
            matmul_input, weight2d, running_mean, running_var, bn_weight, bn_bias, float(eps), act.value, param,
            input_precision,
        )  # fmt: skip
        return _as_output(y, matmul_input)
    if use_triton:
        return _MatmulBatchNormActFunction.apply(
            matmul_input, weight2d, bn_weight, bn_bias, running_mean, running_var, bool(training), float(momentum),
            float(eps), act.value, param, input_precision,
        )  # fmt: skip
    return batch_norm_act_reference(
        torch_z(), running_mean, running_var, bn_weight, bn_bias, bool(training), momentum, eps, act, param
    )


def _dispatch(matmul_input, weight2d, torch_z, bn_weight, bn_bias, running_mean, running_var, training, momentum,
              eps, activation, activation_param, backend, input_precision, device_tensor):  # fmt: skip
    act, param = parse_activation(activation, activation_param)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    use_triton = resolve_backend(backend, device_tensor) == "triton"
    if not use_triton and input_precision != "ieee":
        raise ValueError(
            f"input_precision={input_precision!r} selects the Triton matmul's mode; the torch backend follows "
            "torch.backends.cuda.matmul.allow_tf32 instead (use backend='triton' or input_precision='ieee')"
        )
    device_type = device_tensor.device.type
    if use_triton and torch.is_autocast_enabled(device_type):
        # What autocast does for F.linear / F.conv2d: the matmul's operands in the autocast dtype (a cast copy of
        # a float32 weight, whose gradient flows back to it); BatchNorm keeps its float32 parameters.
        dtype = torch.get_autocast_dtype(device_type)
        matmul_input, weight2d = matmul_input.to(dtype), weight2d.to(dtype)
    args = (matmul_input, weight2d, torch_z, bn_weight, bn_bias)
    if training and running_mean is not None and isinstance(momentum, Tensor):
        # A factor held on the device (momentum=None in the modules): batch statistics into fresh buffers
        # (momentum 1 copies them exactly), then blended into the running ones with tensor ops (no host sync).
        batch_mean, batch_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
        y = _run(*args, batch_mean, batch_var, True, 1.0, eps, act, param, use_triton, input_precision)
        with torch.no_grad():
            factor = momentum.to(running_mean.device)
            running_mean.copy_(running_mean * (1 - factor) + batch_mean * factor)
            running_var.copy_(running_var * (1 - factor) + batch_var * factor)
        return y
    momentum = float(momentum) if isinstance(momentum, (int, float)) else 0.0  # unused without running stats
    return _run(*args, running_mean, running_var, training, momentum, eps, act, param, use_triton, input_precision)


def linear_batch_norm_act(
    input: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    activation: str | Activation = "relu",
    activation_param: float | None = None,
    backend: str = "auto",
    *,
    input_precision: str = "ieee",
) -> Tensor:
    """``activation(F.batch_norm(F.linear(input, weight), running_mean, running_var, bn_weight, bn_bias,
    training, momentum, eps))`` for a 2-D input [M, K] and weight [N, K] (``nn.Linear(bias=False).weight``).

    BatchNorm's arguments and semantics are ``F.batch_norm``'s (``momentum`` may be a 0-dim device tensor, as
    the modules pass for ``momentum=None``); ``backend`` is "auto", "triton" or "torch"
    (see :func:`bnbench.functional.resolve_backend`: "triton" never falls back); ``input_precision`` is the
    Triton matmul's mode for fp32 ("ieee" or "tf32"). Returns [M, N] in the input's dtype.
    """
    vectors = dict(bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean, running_var=running_var)
    _check(input, weight, vectors, training, momentum, 2, "linear_batch_norm_act")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if training and input.shape[0] < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
    return _dispatch(
        input, weight, lambda: F.linear(input, weight), bn_weight, bn_bias, running_mean, running_var, training,
        momentum, eps, activation, activation_param, backend, input_precision, input,
    )  # fmt: skip


def conv1x1_batch_norm_act(
    input: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    activation: str | Activation = "relu",
    activation_param: float | None = None,
    backend: str = "auto",
    *,
    stride: int | tuple[int, int] = 1,
    input_precision: str = "ieee",
) -> Tensor:
    """``activation(F.batch_norm(F.conv2d(input, weight, stride=stride), ...))`` for a 1x1 kernel, no padding,
    no bias: input [B, C_in, H, W], weight [C_out, C_in, 1, 1]. Returns [B, C_out, H_out, W_out] (channels_last
    on the Triton path) with H_out = ceil(H / stride). Other arguments as :func:`linear_batch_norm_act`."""
    vectors = dict(bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean, running_var=running_var)
    _check(input, weight, vectors, training, momentum, 4, "conv1x1_batch_norm_act")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"weight must have shape (C_out, C_in, 1, 1), got {tuple(weight.shape)}")
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in (sh, sw)):
        raise ValueError(f"stride must be a positive int or a pair of them, got {stride!r}")
    rows = input[:, :, ::sh, ::sw]  # the strided view: the 1x1 convolution's rows, no copy
    if training and rows.shape[0] * rows.shape[2] * rows.shape[3] < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got output size "
            f"{(rows.shape[0], weight.shape[0], *rows.shape[2:])}"
        )
    weight2d = weight.view(weight.shape[0], weight.shape[1])  # a view: unit axes drop out of any layout
    return _dispatch(
        rows, weight2d, lambda: F.conv2d(input, weight, stride=(sh, sw)), bn_weight, bn_bias, running_mean,
        running_var, training, momentum, eps, activation, activation_param, backend, input_precision, input,
    )  # fmt: skip
