"""Derivatives of act(BN(x) [+ residual]) beyond the fused first-order backward: what the autograd Functions call when asked
for a second derivative (``create_graph=True``) or for forward-mode AD (a jvp).

- :func:`backward_through_torch`: (dx, dweight, dbias) as differentiable PyTorch ops (the batch statistics
  recomputed from the saved x with ``F.batch_norm``, whose own derivatives PyTorch defines to every order), so a
  second derivative through the fused layer is exact.
- :func:`refuse_second_derivative`: memory-saving mode saved y, not x, and the batch statistics' dependence on x
  cannot be rebuilt from y: first-order gradients are returned as computed, wrapped in a node (tied to the saved
  tensors, so every path to the inputs goes through it) that raises a clear error when differentiated (never a
  silently dropped term).
- :func:`bn_act_jvp`: the forward-mode tangent of y from the tangents of x, weight, bias and the residual.

With a residual r, z = BN(x) + r: its gradient is dy * act'(z) and its tangent enters z as it is.

All in fp32 whatever the input dtype (the kernels' statistics are fp32 too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bnbench.activations import Activation, apply_activation

__all__ = ["RUNNING_STATS_TANGENT_ERROR", "backward_through_torch", "bn_act_jvp", "refuse_second_derivative"]

#: PyTorch's message (and type, RuntimeError) for running statistics with a forward-mode tangent
RUNNING_STATS_TANGENT_ERROR = (
    "batch_norm is not differentiable wrt running_mean and running_var, they cannot have forward grad defined"
)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def backward_through_torch(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    needs_input_grad: tuple[bool, ...],
    *,
    training: bool,
    eps: float,
    activation: Activation,
    act_param: float,
    residual: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias[, dresidual]) of y = act(BN(x) [+ residual]) for ``grad_out``, as a graph of
    differentiable PyTorch ops.

    Training recomputes the batch statistics from x; eval uses ``running_mean``/``running_var`` as constants.
    ``needs_input_grad`` says which of (x, weight, bias) or (x, weight, bias, residual) want a gradient: as many
    gradients are returned, None for those not wanted.
    """
    inputs = (x, weight, bias, residual)[: len(needs_input_grad)]
    wanted = [t for t, need in zip(inputs, needs_input_grad, strict=True) if need and t is not None]
    if grad_out is None or not wanted:
        return (None,) * len(inputs)
    with torch.enable_grad():
        stats = (None, None) if training else (running_mean.float(), running_var.float())
        z = F.batch_norm(x.float(), *stats, _f32(weight), _f32(bias), training, 0.0, eps)
        if residual is not None:
            z = z + residual.float()
        y = apply_activation(z, activation, act_param)
        grads = torch.autograd.grad(y, wanted, grad_out.float(), create_graph=True, materialize_grads=True)
    found = iter(grads)
    return tuple(  # type: ignore[return-value]
        next(found) if need and t is not None else None for t, need in zip(inputs, needs_input_grad, strict=True)
    )


class _SecondDerivativeRefused(torch.autograd.Function):
    """Returns copies of the first ``count`` tensors (the gradients, as values); the others (what the gradients
    depend on) only tie the node into the graph. Differentiating through it raises ``message``."""

    @staticmethod
    def forward(ctx, message: str, count: int, *tensors: Tensor):
        ctx.message = message
        return tuple(t.detach().clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def refuse_second_derivative(
    grads: tuple[Tensor | None, ...], depends_on: tuple[Tensor | None, ...], message: str
) -> tuple[Tensor | None, ...]:
    """``grads`` unchanged when grad mode is off (a plain backward). Under ``create_graph=True`` the same values,
    from a node whose inputs are ``depends_on`` (the saved output, the parameters, the incoming gradient): the
    autograd engine runs it on any second derivative, whichever inputs it is taken for, and it raises
    RuntimeError(message)."""
    anchors = [t for t in depends_on if t is not None and t.requires_grad]
    if not torch.is_grad_enabled() or not anchors:
        return grads
    present = [g for g in grads if g is not None]
    wrapped = iter(_SecondDerivativeRefused.apply(message, len(present), *present, *anchors))
    return tuple(None if g is None else next(wrapped) for g in grads)


def bn_act_jvp(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    tangents: tuple[Tensor | None, ...],
    *,
    training: bool,
    eps: float,
    activation: Activation,
    act_param: float,
    residual: Tensor | None = None,
) -> Tensor:
    """The tangent of y = act(BN(x) [+ residual]) (fp32 math, returned in x's dtype) given the tangents of
    (x, weight, bias) or (x, weight, bias, residual) (None for none). The running statistics are constants (a tangent on them is refused before this runs:
    :data:`RUNNING_STATS_TANGENT_ERROR`).

    With x_hat = (x - mean) * rstd: in training (batch statistics) dx_hat = rstd * (dx - mean(dx) - x_hat *
    mean(x_hat * dx)); in eval dx_hat = rstd * dx. Then dz = dx_hat * w + x_hat * dw + db and dy = act'(z) dz.
    """
    tx, tw, tb, *tr = tangents
    tr = tr[0] if tr and residual is not None else None
    if x.numel() == 0:
        return torch.zeros_like(x)
    C = x.shape[1]
    shape = (1, C) + (1,) * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    if training:
        mean = xf.mean(dims, keepdim=True)
        rstd = torch.rsqrt(xf.var(dims, unbiased=False, keepdim=True) + eps)
    else:
        mean = running_mean.float().view(shape)
        rstd = torch.rsqrt(running_var.float().view(shape) + eps)
    x_hat = (xf - mean) * rstd
    t_z = torch.zeros_like(xf)
    w = weight.float().view(shape) if weight is not None else None
    if tx is not None:
        tx = tx.float()
        if training:
            t_xhat = rstd * (tx - tx.mean(dims, keepdim=True) - x_hat * (x_hat * tx).mean(dims, keepdim=True))
        else:
            t_xhat = rstd * tx
        t_z = t_z + (t_xhat if w is None else t_xhat * w)
    if tw is not None:
        t_z = t_z + x_hat * tw.float().view(shape)
    if tb is not None:
        t_z = t_z + tb.float().view(shape)
    if tr is not None:
        t_z = t_z + tr.float()
    if activation is Activation.IDENTITY:
        return t_z.to(x.dtype)
    z = x_hat if w is None else x_hat * w
    if bias is not None:
        z = z + bias.float().view(shape)
    if residual is not None:
        z = z + residual.float()
    # act is elementwise: its Jacobian is diagonal, so the vector-Jacobian product with t_z is the jvp
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        (t_y,) = torch.autograd.grad(apply_activation(z, activation, act_param), z, t_z)
    return t_y.to(x.dtype)
