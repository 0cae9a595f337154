"""bnbench._derivatives on its own (plain PyTorch, no kernels): the differentiable backward the fused Functions
use under create_graph=True, the forward-mode tangent, and the refusal of a second derivative, against
F.batch_norm + the activation in float64 (PyTorch's own first and second derivatives, and torch.func.jvp).

Through the layers (and the Triton path) these are tested in tests/test_dropin.py and tests/test_module_db.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnbench._derivatives import backward_through_torch, bn_act_jvp, refuse_second_derivative
from bnbench.activations import Activation, apply_activation
from bnbench.testing import rel_err, tolerance

PARAM = {Activation.LEAKY_RELU: 0.1}


def _inputs(dtype):
    x = (torch.randn(4, 3, 5, dtype=torch.float64) * 2 + 1).to(dtype).requires_grad_()  # (N, C, L), C=3
    w = (torch.rand(3, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).to(dtype).requires_grad_()
    running_mean, running_var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    return x, w, b, running_mean, running_var


def _reference(x, w, b, running_mean, running_var, training, activation):
    z = F.batch_norm(x, running_mean.clone(), running_var.clone(), w, b, training, 0.1, 1e-3)
    return apply_activation(z, activation, PARAM.get(activation, 0.0))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", list(Activation))
def test_backward_through_torch_has_exact_first_and_second_derivatives(activation, training):
    x, w, b, rm, rv = _inputs(torch.float32)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    grad = torch.randn(4, 3, 5, dtype=torch.float64)
    first = backward_through_torch(grad.float(), x, w, b, rm.float(), rv.float(), (True, True, True),
                                   training=training, eps=1e-3, activation=activation,
                                   act_param=PARAM.get(activation, 0.0))  # fmt: skip
    y64 = _reference(x64, w64, b64, rm, rv, training, activation)
    first_ref = torch.autograd.grad(y64, (x64, w64, b64), grad, create_graph=True)
    weights = [torch.randn_like(t) for t in first_ref]
    second = torch.autograd.grad(sum((g * u.float()).sum() for g, u in zip(first, weights, strict=True)),
                                 (x, w, b), allow_unused=True, materialize_grads=True)  # fmt: skip
    second_ref = torch.autograd.grad(sum((g * u).sum() for g, u in zip(first_ref, weights, strict=True)),
                                     (x64, w64, b64), allow_unused=True, materialize_grads=True)  # fmt: skip
    for got, expected in zip(first + second, first_ref + second_ref, strict=True):
        assert got.dtype == torch.float32
        assert rel_err(got, expected) < tolerance(torch.float32)


def test_backward_through_torch_skips_unneeded_inputs():
    x, w, b, rm, rv = _inputs(torch.float16)
    dx, dw, db = backward_through_torch(torch.randn(4, 3, 5).half(), x, w, b, rm, rv, (True, False, True),
                                        training=True, eps=1e-5, activation=Activation.SILU, act_param=0.0)  # fmt: skip
    assert dw is None and dx.dtype == torch.float16 and db.dtype == torch.float16
    assert backward_through_torch(None, x, w, b, rm, rv, (True, True, True), training=True, eps=1e-5,
                                  activation=Activation.RELU, act_param=0.0) == (None, None, None)  # fmt: skip


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", list(Activation))
def test_jvp_matches_torch_func_jvp(activation, training):
    x, w, b, rm, rv = (t.detach() for t in _inputs(torch.float32))
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    got = bn_act_jvp(x, w, b, rm.float(), rv.float(), tangents, training=training, eps=1e-3, activation=activation,
                     act_param=PARAM.get(activation, 0.0))  # fmt: skip
    _, expected = torch.func.jvp(
        lambda x, w, b: _reference(x, w, b, rm, rv, training, activation),
        (x.double(), w.double(), b.double()),
        tuple(t.double() for t in tangents),
    )
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < tolerance(torch.float32)


def test_jvp_of_an_empty_batch_is_empty():
    x = torch.randn(0, 3, 2)
    t = bn_act_jvp(x, None, None, None, None, (torch.randn_like(x), None, None), training=True, eps=1e-5,
                   activation=Activation.GELU, act_param=0.0)  # fmt: skip
    assert t.shape == x.shape


def test_refused_second_derivative_raises_on_every_path():
    """The refusing node is reached whichever input a second derivative is taken for, also through
    torch.autograd.grad(inputs=...), which only runs the nodes on a path to those inputs."""
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    y = x * w  # stands for the saved output, which depends on x
    grad_out = torch.randn(5, 3, requires_grad=True)
    with torch.enable_grad():
        grads = refuse_second_derivative((torch.randn(5, 3), None, torch.randn(3)), (y, w, None, grad_out), "nope")
    assert grads[1] is None and all(g.requires_grad for g in (grads[0], grads[2]))
    for inputs in ((x,), (w,), (grad_out,)):
        with pytest.raises(RuntimeError, match=r"^nope$"):
            torch.autograd.grad(grads[0].sum() + grads[2].sum(), inputs, allow_unused=True)
    with torch.no_grad():  # a plain backward: the gradients pass through untouched
        plain = (torch.randn(3),)
        assert refuse_second_derivative(plain, (y,), "nope") is plain


@pytest.mark.parametrize("training", [True, False])
def test_residual_first_second_derivatives_and_jvp(training):
    """With a residual r, z = BN(x) + r: backward_through_torch gives r's gradient (and its second derivatives)
    and bn_act_jvp adds r's tangent, against F.batch_norm + r + silu in float64."""
    act = Activation.SILU
    x, w, b, rm, rv = _inputs(torch.float32)
    r = torch.randn(4, 3, 5).requires_grad_()
    x64, w64, b64, r64 = (t.detach().double().requires_grad_() for t in (x, w, b, r))
    grad = torch.randn(4, 3, 5, dtype=torch.float64)
    first = backward_through_torch(grad.float(), x, w, b, rm.float(), rv.float(), (True, True, True, True),
                                   training=training, eps=1e-3, activation=act, act_param=0.0, residual=r)  # fmt: skip
    y64 = apply_activation(F.batch_norm(x64, rm.clone(), rv.clone(), w64, b64, training, 0.1, 1e-3) + r64, act, 0.0)
    first_ref = torch.autograd.grad(y64, (x64, w64, b64, r64), grad, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in first), (x, w, b, r))
    second_ref = torch.autograd.grad(sum(g.square().sum() for g in first_ref), (x64, w64, b64, r64))
    for got, expected in zip(first + second, first_ref + second_ref, strict=True):
        assert rel_err(got, expected) < tolerance(torch.float32)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b, r))
    got = bn_act_jvp(x.detach(), w.detach(), b.detach(), rm.float(), rv.float(), tangents, training=training,
                     eps=1e-3, activation=act, act_param=0.0, residual=r.detach())  # fmt: skip
    _, expected = torch.func.jvp(
        lambda x, w, b, r: apply_activation(
            F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3) + r, act, 0.0
        ),
        (x64.detach(), w64.detach(), b64.detach(), r64.detach()),
        tuple(t.double() for t in tangents),
    )
    assert rel_err(got, expected) < tolerance(torch.float32)
