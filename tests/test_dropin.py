"""BatchNormAct1d/2d as a true drop-in for nn.BatchNorm1d/2d: each defect a review found, as an assertion.

Kernel cases run the Triton path (the interpreter on CPU, natively on a GPU; the ``launches`` fixture proves the
launchers ran); the reference is nn.BatchNorm (plus the activation) in float64.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import bnbench
from bnbench.modules import NN_BATCHNORM_HAS_BIAS
from bnbench.testing import rel_err, tolerance

LAYERS = [(bnbench.BatchNormAct1d, nn.BatchNorm1d), (bnbench.BatchNormAct2d, nn.BatchNorm2d)]


@pytest.mark.parametrize(("fused", "plain"), LAYERS)
def test_signature_starts_with_nn_batchnorms(fused, plain):
    """nn.BatchNorm's parameters, in its order and kinds (bias= only where the installed torch has it), then the
    fused layer's own, keyword-only."""
    ours = list(inspect.signature(fused.__init__).parameters.values())
    theirs = list(inspect.signature(plain.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [(p.name, p.kind, p.default) for p in theirs]
    extra = ours[len(theirs) :]
    assert [p.name for p in extra] == ["activation", "activation_param", "backend", "memory_saving"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    assert ("bias" in inspect.signature(fused.__init__).parameters) == NN_BATCHNORM_HAS_BIAS


@pytest.mark.skipif(not NN_BATCHNORM_HAS_BIAS, reason="the installed torch's nn.BatchNorm has no bias= (torch < 2.13)")
@pytest.mark.parametrize("training", [True, False])
def test_bias_false_has_weight_only(training, launches, device):
    fused = bnbench.BatchNormAct2d(3, bias=False, activation="relu", device=device)
    plain = nn.BatchNorm2d(3, bias=False, device=device, dtype=torch.float64)
    assert fused.bias is None and fused.weight is not None
    assert [n for n, _ in fused.named_parameters()] == ["weight"]
    assert "bias=False" in repr(fused)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.running_var.uniform_(0.5, 2.0)
    plain.load_state_dict(fused.state_dict())
    fused.train(training)
    plain.train(training)
    x = torch.randn(2, 3, 3, 4, device=device, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    y, y_ref = fused(x), torch.relu(plain(x64))
    grad = torch.randn_like(y_ref)
    y.backward(grad.float())
    y_ref.backward(grad)
    assert rel_err(y, y_ref) < tolerance(torch.float32)
    assert rel_err(x.grad, x64.grad) < 10 * tolerance(torch.float32)
    assert rel_err(fused.weight.grad, plain.weight.grad) < tolerance(torch.float32)
    assert launches["fwd_train" if training else "fwd_eval"] == 1 and launches["bwd"] == 1


@pytest.mark.skipif(NN_BATCHNORM_HAS_BIAS, reason="the installed torch's nn.BatchNorm takes bias=")
def test_bias_keyword_rejected_where_nn_rejects_it():
    with pytest.raises(TypeError, match="bias"):
        nn.BatchNorm1d(3, bias=False)
    with pytest.raises(TypeError, match="bias"):
        bnbench.BatchNormAct1d(3, bias=False)


def test_positional_arguments_are_nn_batchnorms():
    """device and dtype sit where nn.BatchNorm has them (6th and 7th), not the activation."""
    fused = bnbench.BatchNormAct1d(3, 1e-3, None, True, False, "cpu", torch.float64)
    assert (fused.eps, fused.momentum, fused.track_running_stats) == (1e-3, None, False)
    assert fused.weight.dtype == torch.float64 and fused.weight.device.type == "cpu"


# ---------------------------------------------------------------------------------------------------------------
# eps: a non-default value, and channels whose variance is as small as eps (where an eps applied twice, or
# forgotten, changes the output by O(1)): the Triton path against nn.BatchNorm in float64
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-5, 0.1])  # the default, and one far from it
def test_eval_eps_with_small_running_variance(eps, launches, device):
    fused = bnbench.BatchNormAct2d(3, eps=eps, activation="identity", device=device).eval()
    with torch.no_grad():
        fused.running_mean.copy_(torch.tensor([0.5, -0.2, 0.0]))
        fused.running_var.copy_(torch.tensor([eps, 1e-6, 1.5]))  # var == eps, var << eps, var >> eps
        fused.weight.copy_(torch.tensor([1.5, 0.7, -1.0]))
        fused.bias.copy_(torch.tensor([0.1, -0.3, 0.2]))
    plain = nn.BatchNorm2d(3, eps=eps, dtype=torch.float64, device=device).eval()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 3, 3, device=device, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    y, y_ref = fused(x), plain(x64)
    grad = torch.randn_like(y_ref)
    y.backward(grad.float())
    y_ref.backward(grad)
    assert rel_err(y, y_ref) < tolerance(torch.float32)
    assert rel_err(x.grad, x64.grad) < tolerance(torch.float32)
    assert rel_err(fused.weight.grad, plain.weight.grad) < tolerance(torch.float32)
    assert launches["fwd_eval"] == 1 and launches["bwd"] == 1


@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_training_eps_with_a_nearly_constant_channel(eps, launches, device):
    """A channel whose batch variance is about eps: the batch rstd 1/sqrt(var + eps), the running variance update
    (eps not in it), and the gradients all follow nn.BatchNorm."""
    fused = bnbench.BatchNormAct1d(3, eps=eps, activation="leaky_relu", activation_param=0.1, device=device)
    plain = nn.BatchNorm1d(3, eps=eps, dtype=torch.float64, device=device)
    x = torch.randn(8, 3, 5, device=device)
    x[:, 0] = 2.0 + x[:, 0] * eps**0.5  # batch variance ~ eps
    x[:, 1] = -1.0 + x[:, 1] * 1e-3  # batch variance ~ 1e-6, far below eps
    x.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y, y_ref = fused(x), nn.functional.leaky_relu(plain(x64), 0.1)
    grad = torch.randn_like(y_ref)
    y.backward(grad.float())
    y_ref.backward(grad)
    assert rel_err(y, y_ref) < tolerance(torch.float32)
    assert rel_err(x.grad, x64.grad) < 10 * tolerance(torch.float32)
    assert rel_err(fused.weight.grad, plain.weight.grad) < tolerance(torch.float32)
    assert rel_err(fused.running_var, plain.running_var) < tolerance(torch.float32)
    assert launches["fwd_train"] == 1 and launches["bwd"] == 1
