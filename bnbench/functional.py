"""``batch_norm_act``: F.batch_norm followed by an activation, fused into Triton kernels.

The Triton path is the four ``torch.library`` custom ops of :mod:`bnbench._ops`, tied together here by one
autograd.Function (an op that mutates its inputs, the running statistics, cannot take ``register_autograd``), so
torch.compile traces a model that uses them with no graph break. The ``torch`` backend is :mod:`bnbench.reference`.
This module holds the public :func:`batch_norm_act`, its argument checks and the backend choice.

Memory-saving mode (``memory_saving=True``, after in-place activated BatchNorm, Rota Bulo et al. 2018) saves the
output y instead of the input x and rebuilds x_hat = (act^-1(y) - b) / w in backward, so x can be freed.
"""

from __future__ import annotations

import numbers
import sys

import torch
from torch import Tensor
from torch.autograd import forward_ad

from bnbench import _ops
from bnbench._derivatives import (
    RUNNING_STATS_TANGENT_ERROR,
    backward_through_torch,
    bn_act_jvp,
    refuse_second_derivative,
)
from bnbench._precision import check_memory_saving_precision, memory_saving_error_bound, memory_saving_max_ratio
from bnbench.activations import Activation, apply_activation, parse_activation
from bnbench.errors import ShapeError
from bnbench.interpreter import interpreter_active, warn_if_large
from bnbench.reference import MEMORY_SAVING_MIN_ABS_WEIGHT, batch_norm_act_reference, bwd_from_output_reference

__all__ = [
    "BACKENDS",
    "MEMORY_SAVING_MIN_ABS_WEIGHT",
    "RESIDUAL_MEMORY_SAVING_ERROR",
    "TRITON_DTYPES",
    "batch_norm_act",
    "check_residual",
    "memory_saving_error_bound",
    "memory_saving_max_ratio",
    "memory_saving_unsupported",
    "resolve_backend",
]

BACKENDS = ("auto", "triton", "torch")

#: input dtypes the Triton kernels take (``bnbench.kernels.SUPPORTED_DTYPES``, kept here so that choosing a backend
#: imports no triton); backend="auto" runs every other dtype (float64) through PyTorch
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_NOT_INVERTIBLE = {
    Activation.RELU: (
        "relu is not invertible: where y == 0 the pre-activation z <= 0 is lost, yet BatchNorm's input gradient "
        "dx = w*rstd*(dz - mean(dz) - x_hat*mean(dz*x_hat)) needs x_hat at every element, also where dz == 0; "
        "use leaky_relu with a positive slope (as in-place activated BatchNorm does) or memory_saving=False"
    ),
    Activation.SIGMOID: (
        "sigmoid saturates: in float32 sigmoid(z) rounds to 1.0 for z > ~16.6 (in float16/bfloat16 for z > ~8 and "
        "~5.5), so z = logit(y) is lost there and its error grows without bound before that"
    ),
    Activation.TANH: (
        "tanh saturates: in float32 tanh(z) rounds to +-1.0 for |z| > ~9.0 (in float16/bfloat16 for |z| > ~4.2 "
        "and ~3), so z = atanh(y) is lost there and its error grows without bound before that"
    ),
}
for _act in (Activation.GELU, Activation.GELU_TANH, Activation.SILU):
    _NOT_INVERTIBLE[_act] = (
        f"{_act.value} is not monotonic (it has a minimum at z < 0): two pre-activations give the same output, "
        "so the normalised input cannot be rebuilt from y"
    )


def memory_saving_unsupported(activation: Activation, activation_param: float) -> str | None:
    """Why ``memory_saving=True`` cannot be used with this activation, or None when it can."""
    if activation is Activation.LEAKY_RELU and not activation_param > 0.0:
        return f"leaky_relu with negative_slope={activation_param} is not invertible: memory saving needs a slope > 0"
    return _NOT_INVERTIBLE.get(activation)


def _interpreter_active() -> bool:
    return interpreter_active()


def _recording() -> bool:
    """True while bnbench.kernels records launches for a GPU target instead of running them (bnbench inspect)."""
    driver = sys.modules.get("bnbench.kernels._driver")
    return driver is not None and driver.recording_target() is not None


def resolve_backend(backend: str, input: Tensor) -> str:
    """The backend that runs for this input: "triton" or "torch".

    "auto" picks triton for CUDA tensors and under the Triton interpreter when the kernels take the input's dtype
    (:data:`TRITON_DTYPES`), torch otherwise (float64 always). "triton" on a CPU tensor without the interpreter,
    or on a dtype the kernels lack, is an error, never a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    triton_here = input.device.type == "cuda" or (
        input.device.type == "cpu" and (_interpreter_active() or _recording())
    )
    if backend == "auto":
        return "triton" if triton_here and input.dtype in TRITON_DTYPES else "torch"
    if input.dtype not in TRITON_DTYPES:
        raise TypeError(
            f'backend="triton" cannot run input of dtype {input.dtype}: the Triton kernels support float32, float16 '
            f'and bfloat16. backend="auto" runs {input.dtype} through PyTorch.'
        )
    if not triton_here:
        raise ValueError(
            f'backend="triton" needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is imported to run '
            f'on CPU; got a tensor on {input.device}. Use backend="torch" or backend="auto" here.'
        )
    return "triton"


class _BatchNormActFunction(torch.autograd.Function):
    """One autograd path for the Triton backend. Saves x, weight, bias, the residual (when given) and fp32
    mean/rstd (training) or the running statistics (eval); backward recomputes the pre-activation z = x_hat * w +
    b (+ residual). With ``memory_saving`` (no residual) it saves the output y (not x) and rstd (or the running
    variance), and backward rebuilds x_hat from y.

    Returns y only: mean and rstd stay inside (saved for backward), so autograd has no non-differentiable
    outputs to materialise zero gradients for, and a backward launches bnbench's kernels and nothing else.
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation, act_param,
        memory_saving,
    ):  # fmt: skip
        if training:
            y, mean, rstd = _ops.fwd_train(x, weight, bias, running_mean, running_var, momentum, eps, activation,
                                           act_param, residual)  # fmt: skip
        else:
            y = _ops.fwd_eval(x, running_mean, running_var, weight, bias, eps, activation, act_param, residual)
            mean, rstd = running_mean, running_var
        if memory_saving:  # batch_norm_act refuses a residual here
            ctx.save_for_backward(y, weight, bias, rstd)
        else:
            ctx.save_for_backward(x, weight, bias, residual, mean, rstd)
        ctx.config = (training, eps, activation, act_param, memory_saving)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        training, eps, activation, act_param, memory_saving = ctx.config
        if memory_saving:
            y, weight, bias, rstd = ctx.saved_tensors
            dx, dweight, dbias = _ops.bwd_from_output(grad_out, y, rstd, weight, bias, training, eps, activation,
                                                      act_param)  # fmt: skip
            grads = (dx, dweight if weight is not None else None, dbias if bias is not None else None)
            # under create_graph=True: the same values, and a clear error if they are differentiated
            grads = refuse_second_derivative(grads, (y, weight, bias, grad_out), _NO_SECOND_DERIVATIVE)
            return *grads, None, *([None] * 8)
        x, weight, bias, residual, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients PyTorch can differentiate again, from x
            grads = backward_through_torch(
                grad_out, x, weight, bias, mean, rstd, ctx.needs_input_grad[:4], training=training, eps=eps,
                activation=Activation(activation), act_param=act_param, residual=residual,
            )  # fmt: skip
            return *grads, *([None] * 8)
        dx, dweight, dbias, dresidual = _ops.bwd(grad_out, x, mean, rstd, weight, bias, training, eps, activation,
                                                 act_param, residual)  # fmt: skip
        return (
            dx,
            dweight if weight is not None else None,
            dbias if bias is not None else None,
            dresidual if residual is not None else None,
            *([None] * 8),
        )


class _BatchNormActJvpFunction(_BatchNormActFunction):
    """The same, with forward-mode AD: used when an input is a dual tensor (a class of its own, because Dynamo
    cannot trace a Function that defines jvp). Also keeps x, weight, bias and the running statistics for the
    tangent (memory saving or not)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, *config):
        ctx.save_for_forward(x, weight, bias, running_mean, running_var, residual)
        return _BatchNormActFunction.forward(ctx, x, weight, bias, residual, running_mean, running_var, *config)

    @staticmethod
    def jvp(ctx, tx, tw, tb, tr, *_):
        # tangents arrive materialised (zeros where none); the running statistics have none (batch_norm_act)
        training, eps, activation, act_param, _ = ctx.config
        *saved, residual = ctx.saved_tensors
        return bn_act_jvp(
            *saved, (tx, tw, tb, tr), training=training, eps=eps, activation=Activation(activation),
            act_param=act_param, residual=residual,
        )  # fmt: skip


class _MemorySavingReferenceFunction(torch.autograd.Function):
    """Memory-saving mode for the ``torch`` backend: the same math as the kernels in plain PyTorch ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, activation, act_param):
        z, _, rstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)
        if not training:
            rstd = torch.rsqrt(running_var.float() + eps)
        y = apply_activation(z, activation, act_param)
        ctx.save_for_backward(y, weight, bias, rstd)
        ctx.config = (training, eps, activation, act_param)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        y, weight, bias, rstd = ctx.saved_tensors
        training, _, activation, act_param = ctx.config
        grads = bwd_from_output_reference(grad_out, y, rstd, weight, bias, training, activation, act_param)
        return *refuse_second_derivative(grads, (y, weight, bias, grad_out), _NO_SECOND_DERIVATIVE), *([None] * 7)


class _MemorySavingReferenceJvpFunction(_MemorySavingReferenceFunction):
    """The same, with forward-mode AD (see :class:`_BatchNormActJvpFunction`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, *config):
        ctx.save_for_forward(x, weight, bias, running_mean, running_var)
        return _MemorySavingReferenceFunction.forward(ctx, x, weight, bias, running_mean, running_var, *config)

    @staticmethod
    def jvp(ctx, tx, tw, tb, *_):
        training, eps, activation, act_param = ctx.config
        return bn_act_jvp(
            *ctx.saved_tensors, (tx, tw, tb), training=training, eps=eps, activation=activation, act_param=act_param
        )


#: why memory_saving=True refuses a residual
RESIDUAL_MEMORY_SAVING_ERROR = (
    "memory_saving=True does not take a residual: it rebuilds x_hat from the output as (act^-1(y) - b) / w, and "
    "with a residual that is (act^-1(y) - residual - b) / w, which needs the residual kept for backward beside y "
    "and adds a cancellation that the error bound of memory saving (bnbench._precision) does not cover; the "
    "saved-output kernels do not take one. Use memory_saving=False with a residual."
)

_NO_SECOND_DERIVATIVE = (
    "memory_saving=True saved the output, not the input, so this layer has no second derivative (the batch "
    "statistics' dependence on x cannot be rebuilt from y): create_graph=True gave first-order gradients only. "
    "Use memory_saving=False for double backward (a gradient penalty, gradgradcheck)."
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
    eps: float,
) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"expected at least 2-D input (N, C, ...), got shape {tuple(input.shape)}")
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != C:
            raise ShapeError(f"input has {C} channels (shape {tuple(input.shape)}) but {name} has {t.numel()}")
    if training and input.numel() // max(C, 1) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
    if not _is_number(eps):
        raise TypeError(f"eps must be a number, got {eps!r}")
    if training and eps <= 0.0:  # F.batch_norm's checks, in its words
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if training:
        if running_mean is not None and not (
            _is_number(momentum)
            or (isinstance(momentum, Tensor) and momentum.dim() == 0 and momentum.is_floating_point())
        ):
            raise TypeError(
                f"momentum must be a number or a 0-dim floating-point tensor when updating running statistics, got "
                f"{momentum!r} (the modules turn momentum=None into the tensor 1/num_batches_tracked)"
            )
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be defined in evaluation mode (training=False)")


def check_residual(input: Tensor, residual: Tensor | None) -> None:
    """The residual of y = act(BN(x) + residual): a tensor of the input's shape, dtype and device, in any strides
    or memory format (it is read through its own strides, never copied)."""
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise ShapeError(
            f"residual has shape {tuple(residual.shape)} but input has shape {tuple(input.shape)}: "
            "y = act(BN(input) + residual) takes a residual of the input's shape (no broadcasting)"
        )
    if residual.dtype != input.dtype:
        raise TypeError(f"residual has dtype {residual.dtype} but input has dtype {input.dtype}: they must match")
    if residual.device != input.device:
        raise ValueError(f"residual is on {residual.device} but input is on {input.device}: they must match")


def _is_number(value) -> bool:
    """A real number as F.batch_norm takes it: Python's, or a numpy scalar (np.float32(0.1)); not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _has_tangent(*tensors: Tensor | None) -> bool:
    """Whether forward-mode AD tracks any of these (a dual tensor at the current level). False while
    torch.compile traces (it does not support forward-mode AD)."""
    if torch.compiler.is_compiling():
        return False
    if getattr(forward_ad, "_current_level", 0) < 0:  # no dual_level entered: skip the per-tensor look-ups (~us)
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    activation: str | Activation = "relu",
    activation_param: float | None = None,
    backend: str = "auto",
    *,
    residual: Tensor | None = None,
    memory_saving: bool = False,
) -> Tensor:
    r"""Batch normalisation (plus an optional residual) followed by an activation, fused into Triton kernels
    (forward and backward).

    Equal to ``activation(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
    eps) + residual)`` (no add without a residual): per channel c, over the batch and every spatial position,

    .. math::
        y = \mathrm{act}\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta
            + r\right)

    with the batch statistics (biased variance) when ``training``, else ``running_mean`` and ``running_var``.
    Training updates the running statistics in place as :class:`torch.nn.BatchNorm2d` does:
    ``running = (1 - momentum) * running + momentum * batch``, with the unbiased variance. Statistics are
    computed in fp32 whatever the input dtype; gradients are bitwise reproducible (fixed-order reductions).

    Args:
        input: the (N, C), (N, C, L) or (N, C, H, W) tensor. The Triton backend takes float32, float16 or
            bfloat16 in any memory layout (contiguous, channels_last, strided views) and never copies it.
        running_mean, running_var: (C,) running statistics, or None (only when training: then none are kept or
            updated). Updated in place when training.
        weight, bias: (C,) affine parameters gamma and beta, or None (1 and 0).
        training: normalise with the batch statistics (and update the running ones) rather than the running ones.
        momentum: the running-average factor: a number (a numpy scalar too), or a 0-dim tensor on the device
            (the modules pass ``1 / num_batches_tracked`` for ``momentum=None``, so the update needs no host
            synchronisation). Default 0.1.
        eps: added to the variance for numerical stability: > 0 in training, >= 0 in eval. Default 1e-5.
        activation: a name or :class:`bnbench.Activation`: identity, relu, leaky_relu, sigmoid, tanh, gelu,
            gelu_tanh, silu. Default "relu".
        activation_param: leaky_relu's negative slope (default 0.01); None for every other activation.
        backend: "triton" (the fused kernels: CUDA tensors, or CPU under ``TRITON_INTERPRET=1``), "torch" (the
            PyTorch composition of :mod:`bnbench.reference`) or "auto" (triton where it can run and for the
            kernels' dtypes, else torch: float64 always runs through PyTorch; see :func:`resolve_backend`).
            Default "auto".
        residual: a tensor added to the normalised input before the activation (the tail of a ResNet block,
            ``relu(bn(x) + identity)``), or None. It has the input's shape, dtype and device, in any strides or
            memory format (read through its own strides, never copied); its gradient is ``dy * act'(z)``. Not
            with ``memory_saving=True``. Default None.
        memory_saving: save the output instead of the input for backward, which rebuilds the normalised input
            from it (so the input can be freed). Identity and leaky_relu with a positive slope only (see
            :func:`memory_saving_unsupported`); the output must then not be modified in place. The gradients carry
            a relative error up to :func:`memory_saving_error_bound` (u + u_fp32) * (1 + |bias|/|weight|), and
            channels with |weight| < ``MEMORY_SAVING_MIN_ABS_WEIGHT`` are approximate: a call past the dtype's
            tolerance warns (see :mod:`bnbench._precision`). No second derivative: under ``create_graph=True``
            differentiating its gradients raises. Default False.

    Shape:
        - input: (N, C), (N, C, L) or (N, C, H, W)
        - output: the same shape, dtype and memory layout as the input

    Derivatives: second derivatives are exact (under ``create_graph=True`` the Triton path's backward runs as
    differentiable PyTorch ops from the saved input); forward-mode AD (``torch.autograd.forward_ad``) has a jvp.

    Raises:
        ValueError, TypeError: on a bad rank, dtype, momentum, eps (F.batch_norm's checks and words), backend or
            activation, one value per channel in training, a residual of another dtype or device, or a residual
            with memory_saving=True, before any kernel runs.
        bnbench.ShapeError: a running statistic or parameter with the wrong number of channels, or a residual of
            another shape (a ValueError and, as in PyTorch, a RuntimeError).
        RuntimeError: running statistics with a forward-mode tangent (as F.batch_norm).

    Example::

        >>> x = torch.randn(8, 16, 32, 32, device="cuda", requires_grad=True)
        >>> running_mean, running_var = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
        >>> weight = torch.ones(16, device="cuda", requires_grad=True)
        >>> bias = torch.zeros(16, device="cuda", requires_grad=True)
        >>> y = batch_norm_act(x, running_mean, running_var, weight, bias, training=True, activation="silu")
        >>> y.sum().backward()
    """
    act, param = parse_activation(activation, activation_param)
    _check_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    check_residual(input, residual)
    if memory_saving and (reason := memory_saving_unsupported(act, param)) is not None:
        raise ValueError(f"memory_saving=True is not supported for activation {act.value!r}: {reason}")
    if memory_saving and residual is not None:
        raise ValueError(RESIDUAL_MEMORY_SAVING_ERROR)
    use_triton = resolve_backend(backend, input) == "triton"
    if _has_tangent(running_mean, running_var):  # forward-mode AD: F.batch_norm's rule, on every path
        if _has_tangent(input, weight, bias, residual):
            raise RuntimeError(RUNNING_STATS_TANGENT_ERROR)
        # a tangent on the running statistics alone leaves the output without one (their values still update)
        running_mean, running_var = (
            None if t is None else forward_ad.unpack_dual(t).primal for t in (running_mean, running_var)
        )
    if (
        memory_saving
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (input, weight, bias))
    ):
        check_memory_saving_precision(input, weight, bias)
    if use_triton and input.device.type == "cpu" and not _recording():  # the interpreter (a recording runs none)
        warn_if_large(input.numel())
    if training and running_mean is not None and isinstance(momentum, Tensor):
        # A factor held on the device: take the batch statistics into fresh buffers (momentum 1 copies them
        # exactly: 0 * (1 - 1) + 1 * batch), then blend them into the running statistics with tensor ops.
        batch_mean, batch_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
        y = _dispatch(input, batch_mean, batch_var, weight, bias, True, 1.0, eps, act, param, use_triton, memory_saving,
                      residual)  # fmt: skip
        if input.numel() == 0:  # an empty batch has no statistics: the running ones stay as they are
            return y
        with torch.no_grad():
            factor = momentum.to(running_mean.device)
            running_mean.copy_(running_mean * (1 - factor) + batch_mean * factor)
            running_var.copy_(running_var * (1 - factor) + batch_var * factor)
        return y
    momentum = float(momentum) if _is_number(momentum) else 0.0  # unused without running stats
    return _dispatch(input, running_mean, running_var, weight, bias, training, momentum, eps, act, param, use_triton,
                     memory_saving, residual)  # fmt: skip


def _dispatch(input, running_mean, running_var, weight, bias, training, momentum, eps, act, param, use_triton,
              memory_saving, residual):  # fmt: skip
    """Run one backend with a float momentum."""
    training = bool(training)
    forward_mode = _has_tangent(input, weight, bias, residual)
    if use_triton:
        function = _BatchNormActJvpFunction if forward_mode else _BatchNormActFunction
        y = function.apply(
            input, weight, bias, residual, running_mean, running_var, training, momentum, float(eps), act.value,
            param, memory_saving,
        )  # fmt: skip
        return y
    if memory_saving:
        function = _MemorySavingReferenceJvpFunction if forward_mode else _MemorySavingReferenceFunction
        return function.apply(
            input, weight, bias, running_mean, running_var, training, momentum, float(eps), act, param
        )
    return batch_norm_act_reference(input, running_mean, running_var, weight, bias, training, momentum, eps, act, param,
                                    residual)  # fmt: skip
