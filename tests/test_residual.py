"""The residual API, ``act(BN(x) + residual)``: argument checks and the PyTorch path (``backend="torch"``).

The kernels' residual path is tested in ``tests/test_kernels_residual.py``. Here the ``torch`` backend and the modules
are compared with ``nn.BatchNorm`` + add + activation written out (not through ``bnbench.reference``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnbench
from bnbench.activations import apply_activation, parse_activation
from bnbench.testing import rel_err


def _bn_add_act(bn: nn.Module, x, residual, activation, param=None):
    act, param = parse_activation(activation, param)
    return apply_activation(bn(x) + residual, act, param)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_module_torch_backend_matches_batchnorm_add_activation(training, activation):
    """BatchNormAct2d(x, residual) == act(nn.BatchNorm2d(x) + residual): output, running stats and the gradients of
    x, residual, weight and bias; x channels_last with a contiguous residual (different strides, no copy needed)."""
    layer = bnbench.BatchNormAct2d(3, activation=activation, backend="torch").train(training)
    bn = nn.BatchNorm2d(3).train(training)
    with torch.no_grad():
        for module in (layer, bn):
            module.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
            module.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
            module.running_var.fill_(2.0)
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(2, 3, 4, 5, requires_grad=True)
    x2, r2 = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    y = layer(x, r)
    expected = _bn_add_act(bn, x2, r2, activation)
    assert rel_err(y, expected) < 1e-6
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    for name, got, want in (
        ("x", x.grad, x2.grad),
        ("residual", r.grad, r2.grad),
        ("weight", layer.weight.grad, bn.weight.grad),
        ("bias", layer.bias.grad, bn.bias.grad),
        ("running_mean", layer.running_mean, bn.running_mean),
        ("running_var", layer.running_var, bn.running_var),
    ):
        assert rel_err(got, want) < 1e-5, name


def test_functional_torch_backend_momentum_tensor_path():
    """momentum as a device tensor (the modules' momentum=None) takes the blended path: the residual goes with it."""
    x, r = torch.randn(4, 3), torch.randn(4, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = bnbench.batch_norm_act(x, rm, rv, training=True, momentum=torch.tensor(0.5), backend="torch", residual=r)
    expected = F.relu(F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=0.5) + r)
    assert rel_err(y, expected) < 1e-6
    assert rel_err(rm, x.mean(0) * 0.5) < 1e-6


def test_without_residual_unchanged():
    x = torch.randn(4, 3, 5)
    y = bnbench.batch_norm_act(x, None, None, training=True, backend="torch")
    assert torch.equal(y, bnbench.batch_norm_act(x, None, None, training=True, backend="torch", residual=None))


@pytest.mark.parametrize(
    ("residual", "error", "match"),
    [
        (1.0, TypeError, "residual must be a torch.Tensor or None, got float"),
        (torch.zeros(2, 3, 4), ValueError, r"residual has shape \(2, 3, 4\) but input has shape \(2, 3, 5\)"),
        (torch.zeros(1, 3, 5), ValueError, "no broadcasting"),
        (torch.zeros(2, 3, 5, dtype=torch.float64), TypeError, "residual has dtype torch.float64 but input"),
        (torch.zeros(2, 3, 5, device="meta"), ValueError, "residual is on meta but input is on cpu"),
    ],
)
def test_bad_residual_is_refused_before_any_kernel(residual, error, match):
    x = torch.randn(2, 3, 5)
    with pytest.raises(error, match=match):
        bnbench.batch_norm_act(x, None, None, training=True, backend="torch", residual=residual)


def test_memory_saving_refuses_a_residual():
    layer = bnbench.BatchNormAct1d(3, activation="identity", backend="torch", memory_saving=True)
    with pytest.raises(ValueError, match="memory_saving=True does not take a residual"):
        layer(torch.randn(4, 3), torch.randn(4, 3))
    layer(torch.randn(4, 3))  # without one it runs


def test_sync_layer_without_process_group_takes_a_residual():
    layer = bnbench.SyncBatchNormAct(3, activation="tanh", backend="torch")
    bn = nn.BatchNorm1d(3)
    x, r = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    assert rel_err(layer(x, r), torch.tanh(bn(x) + r)) < 1e-6
