"""BatchNormAct1d/2d as a true drop-in for nn.BatchNorm1d/2d: each defect a review found, as an assertion.

Kernel cases run the Triton path (the interpreter on CPU, natively on a GPU; the ``launches`` fixture proves the
launchers ran); the reference is nn.BatchNorm (plus the activation) in float64.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd import forward_ad as fwAD

import bnbench
from bnbench.activations import apply_activation, parse_activation
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
    assert rel_err(x.grad, x64.grad) < tolerance(torch.float32)
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
    assert rel_err(x.grad, x64.grad) < tolerance(torch.float32)
    assert rel_err(fused.weight.grad, plain.weight.grad) < tolerance(torch.float32)
    assert rel_err(fused.running_var, plain.running_var) < tolerance(torch.float32)
    assert launches["fwd_train"] == 1 and launches["bwd"] == 1


# ---------------------------------------------------------------------------------------------------------------
# eps validation: nn.BatchNorm's errors (ValueError, its words), before any kernel
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eps", "training", "message"),
    [
        (-10.0, True, "batch_norm eps must be positive during training, but got -10.0"),
        (0.0, True, "batch_norm eps must be positive during training, but got 0.0"),
        (-1.0, False, "batch_norm eps must be non-negative, but got -1.0"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_eps_raises_like_nn(eps, training, message, backend, launches, device):
    fused = bnbench.BatchNormAct2d(3, eps=eps, activation="identity", backend=backend, device=device).train(training)
    plain = nn.BatchNorm2d(3, eps=eps, device=device).train(training)
    x = torch.randn(2, 3, 2, 2, device=device)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        plain(x)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fused(x)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        bnbench.batch_norm_act(x, None, None, training=True, eps=eps, backend=backend) if training else (
            bnbench.batch_norm_act(x, torch.zeros(3), torch.ones(3), training=False, eps=eps, backend=backend)
        )
    assert sum(launches.values()) == 0


def test_zero_eps_in_eval_is_allowed_like_nn(launches, device):
    fused = bnbench.BatchNormAct2d(3, eps=0.0, activation="identity", device=device).eval()
    plain = nn.BatchNorm2d(3, eps=0.0, device=device, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 2, 2, device=device)
    assert rel_err(fused(x), plain(x.double())) < tolerance(torch.float32)
    assert launches["fwd_eval"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Error types: a running statistic or parameter with the wrong number of channels is a RuntimeError in PyTorch
# (and its tests assert that); bnbench.ShapeError is both that and the project's ValueError
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_wrong_channel_count_is_a_runtime_error_like_nn(name, backend, launches, device):
    x = torch.randn(4, 3, 2, device=device)
    tensors = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "weight": torch.ones(3),
               "bias": torch.zeros(3)}  # fmt: skip
    tensors = {k: v.to(device) for k, v in tensors.items()}
    tensors[name] = torch.ones(4, device=device)
    for training in (True, False):
        with pytest.raises(RuntimeError):
            nn.functional.batch_norm(x, training=training, **tensors)
        with pytest.raises(RuntimeError, match=rf"input has 3 channels .* but {name} has 4"):
            bnbench.batch_norm_act(x, training=training, activation="identity", backend=backend, **tensors)
        with pytest.raises(ValueError):  # the project's convention for bad input, too
            bnbench.batch_norm_act(x, training=training, activation="identity", backend=backend, **tensors)
    module = bnbench.BatchNormAct1d(3, backend=backend, device=device)
    with pytest.raises(bnbench.ShapeError, match="input has 4 channels"):
        module(torch.randn(2, 4, device=device))
    assert issubclass(bnbench.ShapeError, ValueError) and issubclass(bnbench.ShapeError, RuntimeError)
    assert sum(launches.values()) == 0


def test_kernel_launchers_raise_the_same_kind_of_error(device):
    """The launchers' own check (kernels/ imports nothing of bnbench, hence a class of its own): also both."""
    from bnbench import kernels
    from bnbench.kernels._errors import ShapeError

    assert issubclass(ShapeError, ValueError) and issubclass(ShapeError, RuntimeError)
    x = torch.randn(4, 3, device=device)
    with pytest.raises(ShapeError, match=r"weight must have shape \(3,\)"):
        kernels.bn_act_fwd_train(x, torch.ones(4, device=device), None, None, None, momentum=0.1, eps=1e-5,
                                 activation="identity")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# numpy scalar momentum, as nn.BatchNorm and F.batch_norm accept it
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [np.float32(0.3), np.float64(0.3), np.int64(1)])
def test_numpy_scalar_momentum(momentum, launches, device):
    fused = bnbench.BatchNormAct1d(3, momentum=momentum, activation="identity", device=device)
    plain = nn.BatchNorm1d(3, momentum=momentum, device=device, dtype=torch.float64)
    for _ in range(2):
        x = torch.randn(5, 3, device=device) * 2 + 1
        assert rel_err(fused(x), plain(x.double())) < tolerance(torch.float32)
    assert rel_err(fused.running_mean, plain.running_mean) < tolerance(torch.float32)
    assert rel_err(fused.running_var, plain.running_var) < tolerance(torch.float32)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    bnbench.batch_norm_act(x, running_mean, running_var, training=True, momentum=momentum, activation="identity")
    expected_mean = torch.zeros(3, device=device, dtype=torch.float64)
    nn.functional.batch_norm(x.double(), expected_mean, torch.ones(3, device=device, dtype=torch.float64),
                             training=True, momentum=momentum)  # fmt: skip
    assert rel_err(running_mean, expected_mean) < tolerance(torch.float32)
    assert launches["fwd_train"] == 3


def test_non_number_momentum_is_refused(device):
    x = torch.randn(5, 3, device=device)
    with pytest.raises(TypeError, match="momentum must be a number"):
        bnbench.batch_norm_act(x, torch.zeros(3), torch.ones(3), training=True, momentum="0.1")
    with pytest.raises(TypeError, match="momentum must be a number"):
        bnbench.batch_norm_act(x, torch.zeros(3), torch.ones(3), training=True, momentum=True)


# ---------------------------------------------------------------------------------------------------------------
# float64: backend="auto" serves it through the PyTorch path; backend="triton" refuses it clearly
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_float64_under_auto_runs_the_pytorch_path(training, launches, device):
    fused = bnbench.BatchNormAct2d(3, activation="gelu").double().to(device).train(training)
    plain = nn.BatchNorm2d(3).double().to(device).train(training)
    x = torch.randn(2, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    y = fused(x)
    expected = nn.functional.gelu(plain(x))
    assert y.dtype == torch.float64
    assert rel_err(y, expected) < tolerance(torch.float64)
    assert rel_err(fused.running_var, plain.running_var) < tolerance(torch.float64)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(expected.sum(), x)
    assert rel_err(g, g_ref) < tolerance(torch.float64)
    assert sum(launches.values()) == 0
    assert bnbench.functional.resolve_backend("auto", x) == "torch"
    assert bnbench.functional.resolve_backend("auto", x.float()) == ("triton" if sum_triton_here(x) else "torch")


def sum_triton_here(x):
    return x.device.type == "cuda" or bnbench.functional._interpreter_active()


def test_float64_with_the_triton_backend_is_refused_clearly(launches, device):
    fused = bnbench.BatchNormAct1d(3, backend="triton", dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match=r"torch\.float64.*float32, float16 and bfloat16"):
        fused(torch.randn(4, 3, dtype=torch.float64, device=device))
    assert sum(launches.values()) == 0


def test_the_backend_choice_knows_the_kernels_dtypes():
    from bnbench import kernels

    assert set(bnbench.functional.TRITON_DTYPES) == set(kernels.SUPPORTED_DTYPES)


def test_convert_reports_float64_honestly(launches, device):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()).double().to(device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    converted, report = bnbench.convert_bn_act(model, return_report=True)  # auto: runs, through PyTorch
    assert report.converted == {"1": "relu"}
    assert rel_err(converted(x), model(x)) < tolerance(torch.float64)
    refused, report = bnbench.convert_bn_act(model, backend="triton", return_report=True)
    assert not report.converted
    assert "float64" in report.skipped["1"] and 'backend="auto"' in report.skipped["1"]
    assert rel_err(refused(x), model(x)) < tolerance(torch.float64)  # left as it was: still runs
    assert sum(launches.values()) == 0


# ---------------------------------------------------------------------------------------------------------------
# Second derivatives (create_graph=True): exact through the Triton path; memory-saving mode refuses clearly
# ---------------------------------------------------------------------------------------------------------------


def _gradient_penalty(layer_or_fn, x, weight, extra):
    """A gradient-penalty loss whose input gradient also has a path that does not go through the layer:
    f = sum(act(BN(x)) * extra) + sum(x**3) / 3, loss = ||df/dx||^2 + sum(df/dweight)."""
    f = (layer_or_fn(x) * extra).sum() + (x**3).sum() / 3
    gx, gw = torch.autograd.grad(f, (x, weight), create_graph=True)
    return (gx**2).sum() + gw.sum()


@pytest.mark.parametrize("activation", ["identity", "leaky_relu", "silu"])
@pytest.mark.parametrize("training", [True, False])
def test_second_derivatives_through_the_triton_path_are_exact(activation, training, launches, device):
    fused = bnbench.BatchNormAct2d(3, eps=1e-3, activation=activation, device=device).train(training)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.normal_()
        fused.running_var.uniform_(0.5, 2.0)
    plain = nn.BatchNorm2d(3, eps=1e-3, device=device, dtype=torch.float64).train(training)
    plain.load_state_dict(fused.state_dict())
    act, param = parse_activation(activation)
    x = (torch.randn(2, 3, 3, 2, device=device) * 2 + 1).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    extra = torch.randn(2, 3, 3, 2, device=device, dtype=torch.float64)
    _gradient_penalty(fused, x, fused.weight, extra.float()).backward()
    _gradient_penalty(lambda t: apply_activation(plain(t), act, param), x64, plain.weight, extra).backward()
    assert fused.weight.grad is not None
    # identity: no second derivative depends on the bias, and nn leaves its grad None too
    assert (fused.bias.grad is None) == (plain.bias.grad is None)
    assert rel_err(x.grad, x64.grad) < tolerance(torch.float32)
    assert rel_err(fused.weight.grad, plain.weight.grad) < tolerance(torch.float32)
    if plain.bias.grad is not None:
        assert rel_err(fused.bias.grad, plain.bias.grad) < tolerance(torch.float32)
    assert launches["fwd_train" if training else "fwd_eval"] == 1


def test_plain_backward_still_runs_the_kernels(launches, device):
    fused = bnbench.BatchNormAct1d(3, device=device)
    fused(torch.randn(4, 3, device=device, requires_grad=True)).sum().backward()
    assert launches["bwd"] == 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("training", [True, False])
def test_memory_saving_refuses_second_derivatives(backend, training, launches, device):
    fused = bnbench.BatchNormAct1d(3, activation="leaky_relu", backend=backend, memory_saving=True,
                                   device=device).train(training)  # fmt: skip
    x = torch.randn(6, 3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"memory_saving=True.*second derivative"):
        _gradient_penalty(fused, x, fused.weight, torch.randn(6, 3, device=device)).backward()
    # first-order gradients under create_graph=True are still the right values
    y = fused(x)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad(bnbench.BatchNormAct1d(3, activation="leaky_relu", backend=backend,
                                      device=device).train(training)(x).sum(), x)  # fmt: skip
    assert rel_err(gx, expected) < tolerance(torch.float32)
    assert launches["bwd_from_output"] == (2 if backend == "triton" else 0)


def test_gradgradcheck_on_the_torch_backend(device):
    x = torch.randn(3, 2, 2, device=device, dtype=torch.float64, requires_grad=True)  # tiny: gradgradcheck is O(n^2)
    w = (torch.rand(2, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, device=device, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return bnbench.batch_norm_act(x, None, None, w, b, training=True, activation="silu", backend="torch")

    assert torch.autograd.gradgradcheck(fn, (x, w, b))

    def saving(x, w, b):
        return bnbench.batch_norm_act(x, None, None, w, b, training=True, activation="identity", backend="torch",
                                      memory_saving=True)  # fmt: skip

    assert torch.autograd.gradcheck(saving, (x, w, b))
    with pytest.raises(RuntimeError, match=r"memory_saving=True.*second derivative"):
        torch.autograd.gradgradcheck(saving, (x, w, b))


# ---------------------------------------------------------------------------------------------------------------
# Forward-mode AD: a jvp on the Triton path (and memory-saving mode), PyTorch's error for tangents on the running
# statistics
# ---------------------------------------------------------------------------------------------------------------


# memory saving only with the invertible activations it accepts (gelu is refused: tests/test_memory_saving.py)
@pytest.mark.parametrize(
    ("activation", "memory_saving"),
    [("identity", False), ("leaky_relu", False), ("gelu", False), ("identity", True), ("leaky_relu", True)],
)
@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad_matches_nn(activation, training, memory_saving, launches, device):
    act, param = parse_activation(activation)
    x = torch.randn(4, 3, 2, device=device) * 2 + 1
    w, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    with fwAD.dual_level():
        y = bnbench.batch_norm_act(fwAD.make_dual(x, tx), rm.clone(), rv.clone(), fwAD.make_dual(w, tw),
                                   fwAD.make_dual(b, tb), training, 0.1, 1e-3, activation, backend="triton",
                                   memory_saving=memory_saving)  # fmt: skip
        tangent = fwAD.unpack_dual(y).tangent
    _, expected = torch.func.jvp(
        lambda x, w, b: apply_activation(
            nn.functional.batch_norm(x, rm.double(), rv.double(), w, b, training, 0.1, 1e-3), act, param
        ),
        (x.double(), w.double(), b.double()),
        (tx.double(), tw.double(), tb.double()),
    )
    assert tangent is not None and tangent.dtype == x.dtype
    assert rel_err(tangent, expected) < tolerance(torch.float32)
    assert launches["fwd_train" if training else "fwd_eval"] == 1


def test_forward_mode_ad_through_the_module(launches, device):
    fused = bnbench.BatchNormAct2d(3, activation="relu", device=device)
    plain = nn.BatchNorm2d(3, device=device, dtype=torch.float64)
    x, tx = torch.randn(2, 3, 2, 2, device=device), torch.randn(2, 3, 2, 2, device=device)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fused(fwAD.make_dual(x, tx))).tangent
        expected = fwAD.unpack_dual(torch.relu(plain(fwAD.make_dual(x.double(), tx.double())))).tangent
    assert rel_err(tangent, expected) < tolerance(torch.float32)
    assert rel_err(fused.running_var, plain.running_var) < tolerance(torch.float32)
    assert launches["fwd_train"] == 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_running_statistics_with_a_tangent_raise_like_pytorch(backend, device):
    x, rm, rv, w = torch.randn(3, 2, 5), torch.randn(2), torch.rand(2) + 1, torch.randn(2)
    x, rm, rv, w = (t.to(device) for t in (x, rm, rv, w))
    with fwAD.dual_level():
        dual_rm = fwAD.make_dual(rm, torch.ones_like(rm))
        with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
            nn.functional.batch_norm(fwAD.make_dual(x, torch.ones_like(x)), dual_rm, rv, w, training=False)
        with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
            bnbench.batch_norm_act(fwAD.make_dual(x, torch.ones_like(x)), dual_rm, rv, w, training=False,
                                   activation="identity", backend=backend)  # fmt: skip
        # a tangent on the running statistics alone: no error and no output tangent, as F.batch_norm
        y = bnbench.batch_norm_act(x, dual_rm, rv, w, training=False, activation="identity", backend=backend)
        assert fwAD.unpack_dual(y).tangent is None
        # in training the running statistics still update in place (the dual's primal is rm itself)
        expected = (1 - 0.1) * rm + 0.1 * x.mean((0, 2))
        y = bnbench.batch_norm_act(x, dual_rm, rv, w, training=True, activation="identity", backend=backend)
        assert fwAD.unpack_dual(y).tangent is None
    assert rel_err(rm, expected) < tolerance(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Memory-saving precision: x_hat rebuilt from the saved output carries a relative error up to
# (u_dtype + u_fp32) * (1 + |bias| / |weight|); past the dtype's tolerance the layer warns, naming the numbers
# ---------------------------------------------------------------------------------------------------------------


def _memory_saving_step(dtype, weight, bias, backend, device):
    fused = bnbench.BatchNormAct2d(3, activation="leaky_relu", activation_param=0.1, backend=backend,
                                   memory_saving=True, device=device, dtype=dtype)  # fmt: skip
    plain = nn.BatchNorm2d(3, device=device, dtype=torch.float64)
    with torch.no_grad():
        fused.weight.copy_(torch.tensor(weight))
        fused.bias.copy_(torch.tensor(bias))
    plain.load_state_dict(fused.state_dict())
    x = (torch.randn(4, 3, 4, 4, device=device) * 2 + 1).to(dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    grad = torch.randn(4, 3, 4, 4, device=device, dtype=torch.float64)
    fused(x).backward(grad.to(dtype))
    nn.functional.leaky_relu(plain(x64), 0.1).backward(grad)
    return {"dx": rel_err(x.grad, x64.grad), "dweight": rel_err(fused.weight.grad, plain.weight.grad),
            "dbias": rel_err(fused.bias.grad, plain.bias.grad)}  # fmt: skip


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_memory_saving_warns_where_the_bound_passes_the_tolerance(dtype, backend, launches, device):
    # w = 0.01, b = 5: |b|/|w| = 500 (the review's case: dweight 46% off in float16, 310% in bfloat16)
    with pytest.warns(
        UserWarning, match=r"memory_saving=True.*\|bias\|/\|weight\| = (499\.\d|500) in channel 0"
    ) as record:
        errors = _memory_saving_step(dtype, [0.01, 1.0, 1.0], [5.0, 0.0, 0.0], backend, device)
    bound = bnbench.functional.memory_saving_error_bound(dtype, 500.0)
    assert f"{bound:.2g}" in str(record[0].message)
    assert bound > tolerance(dtype) and max(errors.values()) > tolerance(dtype)  # the warning was needed
    assert launches["bwd_from_output"] == (1 if backend == "triton" else 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_memory_saving_within_the_bound_is_silent_and_accurate(dtype, launches, device, recwarn):
    ratio = 0.5 * bnbench.functional.memory_saving_max_ratio(dtype)  # half the ratio the dtype allows
    errors = _memory_saving_step(dtype, [1.0, -0.5, 2.0], [ratio, 0.5 * ratio, -ratio], "triton", device)
    assert not [w for w in recwarn if "memory_saving" in str(w.message)]
    assert max(errors.values()) < tolerance(dtype), errors
    assert launches["bwd_from_output"] == 1


def test_memory_saving_bound_numbers():
    """The ratio |b|/|w| each dtype allows: (u + u_fp32) * (1 + r) <= tolerance."""
    f = bnbench.functional
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        r = f.memory_saving_max_ratio(dtype)
        assert f.memory_saving_error_bound(dtype, r) == pytest.approx(tolerance(dtype))
    assert f.memory_saving_max_ratio(torch.float16) == pytest.approx(9.2, abs=0.1)
    assert f.memory_saving_max_ratio(torch.bfloat16) == pytest.approx(4.1, abs=0.1)
    # float32: tolerance(float32) / (2 * 2**-24) - 1
    assert f.memory_saving_max_ratio(torch.float32) == pytest.approx(tolerance(torch.float32) * 2**23 - 1)
