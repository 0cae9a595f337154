"""``batch_norm_act``: F.batch_norm followed by an activation, fused into Triton kernels.

The Triton path is four ``torch.library`` custom ops (``bnbench::bn_act_fwd_train``, ``bnbench::bn_act_fwd_eval``,
``bnbench::bn_act_bwd``, ``bnbench::bn_act_bwd_from_output``) with fake implementations, tied together by one
autograd.Function (an op that mutates its inputs, the running statistics, cannot take ``register_autograd``), so
torch.compile traces a model that uses them with no graph break. The ``torch`` backend is :mod:`bnbench.reference`.

Memory-saving mode (``memory_saving=True``, after in-place activated BatchNorm, Rota Bulo et al. 2018) saves the
output y instead of the input x and rebuilds x_hat = (act^-1(y) - b) / w in backward, so x can be freed.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

from bnbench.activations import Activation, apply_activation, parse_activation
from bnbench.reference import batch_norm_act_reference

__all__ = ["BACKENDS", "MEMORY_SAVING_MIN_ABS_WEIGHT", "batch_norm_act", "memory_saving_unsupported", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch")

#: memory-saving backward divides by gamma; |gamma| is floored here (x_hat is unrecoverable where gamma == 0)
MEMORY_SAVING_MIN_ABS_WEIGHT = 1e-5

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


def _kernels():
    """The Triton launchers, imported on first use (importing bnbench must not import triton)."""
    from bnbench import kernels

    return kernels


def _interpreter_active() -> bool:
    if "bnbench.kernels" in sys.modules:  # already built: ask what the kernels were built for
        return _kernels().interpreter_active()
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _recording() -> bool:
    """True while bnbench.kernels records launches for a GPU target instead of running them (bnbench inspect)."""
    driver = sys.modules.get("bnbench.kernels._driver")
    return driver is not None and driver.recording_target() is not None


def resolve_backend(backend: str, input: Tensor) -> str:
    """The backend that runs for this input: "triton" or "torch".

    "auto" picks triton for CUDA tensors and under the Triton interpreter, torch elsewhere. "triton" on a CPU
    tensor without the interpreter is an error, never a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends are: {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    triton_here = input.device.type == "cuda" or (
        input.device.type == "cpu" and (_interpreter_active() or _recording())
    )
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
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().bn_act_fwd_train(
        x, weight, bias, running_mean, running_var,
        momentum=momentum, eps=eps, activation=activation, act_param=act_param,
    )  # fmt: skip


_fwd_train = torch.library.custom_op("bnbench::bn_act_fwd_train", mutates_args=("running_mean", "running_var"))(
    _fwd_train_impl
)


@_fwd_train.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, activation, act_param):
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
) -> Tensor:
    return _kernels().bn_act_fwd_eval(
        x, running_mean, running_var, weight, bias, eps=eps, activation=activation, act_param=act_param
    )


_fwd_eval = torch.library.custom_op("bnbench::bn_act_fwd_eval", mutates_args=())(_fwd_eval_impl)


@_fwd_eval.register_fake
def _(x, running_mean, running_var, weight, bias, eps, activation, act_param):
    return torch.empty_like(x)


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
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = _kernels().bn_act_bwd(
        grad_out, x, mean, rstd_or_var, weight, bias,
        training=training, eps=eps, activation=activation, act_param=act_param,
    )  # fmt: skip
    # custom ops return tensors only: an empty tensor stands for "no parameter"
    return dx, _or_empty(dweight, x), _or_empty(dbias, x)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _fake_grads(like: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Output metadata of the backward ops: (grad like ``like``, dweight, dbias), empty for a missing parameter."""
    grads = (None if p is None else torch.empty_like(p) for p in (weight, bias))
    return torch.empty_like(like), *(_or_empty(g, like) for g in grads)


_bwd = torch.library.custom_op("bnbench::bn_act_bwd", mutates_args=())(_bwd_impl)


@_bwd.register_fake
def _(grad_out, x, mean, rstd_or_var, weight, bias, training, eps, activation, act_param):
    return _fake_grads(x, weight, bias)


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
    dx, dweight, dbias = _kernels().bn_act_bwd_from_output(
        grad_out, y, rstd_or_var, weight, bias, training=training, eps=eps, activation=activation,
        act_param=act_param, min_abs_weight=MEMORY_SAVING_MIN_ABS_WEIGHT,
    )  # fmt: skip
    return dx, _or_empty(dweight, y), _or_empty(dbias, y)


_bwd_from_output = torch.library.custom_op("bnbench::bn_act_bwd_from_output", mutates_args=())(_bwd_from_output_impl)


@_bwd_from_output.register_fake
def _(grad_out, y, rstd_or_var, weight, bias, training, eps, activation, act_param):
    return _fake_grads(y, weight, bias)


def _op(op, impl):
    """The custom op while torch.compile traces (an opaque node with a fake implementation); the plain
    implementation in eager mode, where going through the dispatcher would only add host overhead (tens of
    microseconds a call, as much as a small input's whole kernel time)."""
    return op if torch.compiler.is_compiling() else impl


class _BatchNormActFunction(torch.autograd.Function):
    """One autograd path for the Triton backend. Saves x, weight, bias and fp32 mean/rstd (training) or the
    running statistics (eval); backward recomputes the pre-activation. With ``memory_saving`` it saves the
    output y (not x) and rstd (or the running variance), and backward rebuilds x_hat from y."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, activation, act_param, memory_saving
    ):
        if training:
            fwd_train = _op(_fwd_train, _fwd_train_impl)
            y, mean, rstd = fwd_train(x, weight, bias, running_mean, running_var, momentum, eps, activation, act_param)
        else:
            y = _op(_fwd_eval, _fwd_eval_impl)(x, running_mean, running_var, weight, bias, eps, activation, act_param)
            mean, rstd = running_mean, running_var
        if memory_saving:
            ctx.save_for_backward(y, weight, bias, rstd)
        else:
            ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.config = (training, eps, activation, act_param, memory_saving)
        ctx.mark_non_differentiable(mean, rstd)
        return y, mean, rstd

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        training, eps, activation, act_param, memory_saving = ctx.config
        if memory_saving:
            y, weight, bias, rstd = ctx.saved_tensors
            bwd = _op(_bwd_from_output, _bwd_from_output_impl)
            dx, dweight, dbias = bwd(grad_out, y, rstd, weight, bias, training, eps, activation, act_param)
        else:
            x, weight, bias, mean, rstd = ctx.saved_tensors
            bwd = _op(_bwd, _bwd_impl)
            dx, dweight, dbias = bwd(grad_out, x, mean, rstd, weight, bias, training, eps, activation, act_param)
        return (
            dx,
            dweight if weight is not None else None,
            dbias if bias is not None else None,
            *([None] * 8),
        )


class _MemorySavingReferenceFunction(torch.autograd.Function):
    """Memory-saving mode for the ``torch`` backend: the same math as the kernels in plain PyTorch ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, activation, act_param):
        z, _, rstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)
        if not training:
            rstd = torch.rsqrt(running_var.float() + eps)
        y = apply_activation(z, activation, act_param)
        ctx.save_for_backward(y, weight, bias, rstd)
        ctx.config = (training, activation, act_param)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        y, weight, bias, rstd = ctx.saved_tensors
        training, activation, act_param = ctx.config
        dx, dweight, dbias = _bwd_from_output_reference(
            grad_out, y, rstd, weight, bias, training, activation, act_param
        )
        return dx, dweight, dbias, *([None] * 7)


def _bwd_from_output_reference(grad_out, y, rstd, weight, bias, training, activation, act_param):
    """(dx, dweight, dbias) of y = act(BN(x)) from y in fp32 PyTorch ops; mirrors ``kernels/_memory_saving.py``."""
    C = y.shape[1]
    shape = (1, C) + (1,) * (y.dim() - 2)
    dims = [0, *range(2, y.dim())]
    yf, dy = y.float(), grad_out.float()
    w = weight.float() if weight is not None else yf.new_ones(C)
    b = bias.float() if bias is not None else yf.new_zeros(C)
    if activation is Activation.IDENTITY:
        z, dz = yf, dy
    else:  # leaky_relu with a positive slope (memory_saving_unsupported rules out the rest)
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
        if running_mean is not None and not (
            (isinstance(momentum, (int, float)) and not isinstance(momentum, bool))
            or (isinstance(momentum, Tensor) and momentum.dim() == 0 and momentum.is_floating_point())
        ):
            raise TypeError(
                f"momentum must be a number or a 0-dim floating-point tensor when updating running statistics, got "
                f"{momentum!r} (the modules turn momentum=None into the tensor 1/num_batches_tracked)"
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
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    activation: str | Activation = "relu",
    activation_param: float | None = None,
    backend: str = "auto",
    *,
    memory_saving: bool = False,
) -> Tensor:
    """``activation(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))``.

    Same arguments and semantics as :func:`torch.nn.functional.batch_norm`, plus the activation (a name or
    :class:`bnbench.Activation`; ``activation_param`` is leaky_relu's negative slope) and the backend
    ("auto", "triton" or "torch"; see :func:`resolve_backend`). Training updates the running statistics in
    place (unbiased variance) with ``momentum``: a number, or a 0-dim tensor on the device (the modules pass
    ``1 / num_batches_tracked`` for ``momentum=None``, so the update needs no host synchronisation).

    ``memory_saving=True`` saves the output instead of the input for backward (identity and leaky_relu with a
    positive slope only: see :func:`memory_saving_unsupported`); the output must then not be modified in place.
    Gradients of channels with |weight| < ``MEMORY_SAVING_MIN_ABS_WEIGHT`` are approximate in that mode.
    """
    act, param = parse_activation(activation, activation_param)
    _check_args(input, running_mean, running_var, weight, bias, training, momentum)
    if memory_saving and (reason := memory_saving_unsupported(act, param)) is not None:
        raise ValueError(f"memory_saving=True is not supported for activation {act.value!r}: {reason}")
    use_triton = resolve_backend(backend, input) == "triton"
    if training and running_mean is not None and isinstance(momentum, Tensor):
        # A factor held on the device: take the batch statistics into fresh buffers (momentum 1 copies them
        # exactly: 0 * (1 - 1) + 1 * batch), then blend them into the running statistics with tensor ops.
        batch_mean, batch_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
        y = _dispatch(input, batch_mean, batch_var, weight, bias, True, 1.0, eps, act, param, use_triton, memory_saving)
        if input.numel() == 0:  # an empty batch has no statistics: the running ones stay as they are
            return y
        with torch.no_grad():
            factor = momentum.to(running_mean.device)
            running_mean.copy_(running_mean * (1 - factor) + batch_mean * factor)
            running_var.copy_(running_var * (1 - factor) + batch_var * factor)
        return y
    momentum = float(momentum) if isinstance(momentum, (int, float)) else 0.0  # unused without running stats
    return _dispatch(input, running_mean, running_var, weight, bias, training, momentum, eps, act, param, use_triton,
                     memory_saving)  # fmt: skip


def _dispatch(input, running_mean, running_var, weight, bias, training, momentum, eps, act, param, use_triton,
              memory_saving):  # fmt: skip
    """Run one backend with a float momentum."""
    training = bool(training)
    if use_triton:
        y, _, _ = _BatchNormActFunction.apply(
            input, weight, bias, running_mean, running_var, training, momentum, float(eps), act.value, param,
            memory_saving,
        )  # fmt: skip
        return y
    if memory_saving:
        return _MemorySavingReferenceFunction.apply(
            input, weight, bias, running_mean, running_var, training, momentum, float(eps), act, param
        )
    return batch_norm_act_reference(input, running_mean, running_var, weight, bias, training, momentum, eps, act, param)
