"""BatchNormAct1d/2d: exactly nn.BatchNormXd followed by the activation (running statistics, momentum=None,
num_batches_tracked, eval, affine=False, track_running_stats=False, state_dict), and the errors PyTorch raises.

The fused modules run the Triton path (the interpreter on CPU); the reference is a float64 copy of the
nn.BatchNorm module followed by the activation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bnbench
from bnbench.activations import apply_activation, parse_activation
from bnbench.testing import rel_err


def twin(fused: nn.Module) -> nn.Module:
    """The float64 nn.BatchNorm module with the same hyper-parameters and state as ``fused``."""
    cls = nn.BatchNorm2d if isinstance(fused, nn.BatchNorm2d) else nn.BatchNorm1d
    ref = cls(
        fused.num_features, fused.eps, fused.momentum, fused.affine, fused.track_running_stats, dtype=torch.float64
    )
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in fused.state_dict().items()})
    ref.train(fused.training)
    return ref


def compare_steps(fused, x_shape, device, steps=3, activation="relu", channels_last=False):
    ref = twin(fused)
    act, param = parse_activation(activation, fused.activation_param if activation == "leaky_relu" else None)
    for _ in range(steps):
        x = torch.randn(x_shape, device=device) * 1.5 + 0.3
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        xf = x.detach().requires_grad_(True)
        xr = x.detach().double().requires_grad_(True)
        y = fused(xf)
        yr = apply_activation(ref(xr), act, param)
        grad = torch.randn_like(x)
        y.backward(grad)
        yr.backward(grad.double())
        assert rel_err(y, yr) < 1e-5
        assert rel_err(xf.grad, xr.grad) < 1e-4
        if fused.affine:
            assert rel_err(fused.weight.grad, ref.weight.grad) < 1e-5
            assert rel_err(fused.bias.grad, ref.bias.grad) < 1e-5
            fused.weight.grad = fused.bias.grad = ref.weight.grad = ref.bias.grad = None
        if fused.track_running_stats:
            # fp32 batch means carry an error ~1e-7 * std, large relative to a mean near 0: hence 1e-5
            assert rel_err(fused.running_mean, ref.running_mean) < 1e-5
            assert rel_err(fused.running_var, ref.running_var) < 1e-5
            assert int(fused.num_batches_tracked) == int(ref.num_batches_tracked)
    return ref


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average with factor 1/num_batches_tracked
@pytest.mark.parametrize(
    ("cls", "shape"),
    [
        (bnbench.BatchNormAct1d, (6, 3)),  # (N, C)
        (bnbench.BatchNormAct1d, (4, 3, 5)),  # (N, C, L)
        (bnbench.BatchNormAct2d, (2, 3, 3, 5)),  # NCHW
    ],
)
def test_training_steps_then_eval_match_nn_batchnorm(cls, shape, momentum, launches, device):
    fused = cls(3, momentum=momentum, activation="leaky_relu", activation_param=0.2, device=device)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.uniform_(-0.5, 0.5)
    ref = compare_steps(fused, shape, device, activation="leaky_relu")
    fused.eval()
    ref.eval()
    x = torch.randn(shape, device=device)
    expected = nn.functional.leaky_relu(ref(x.double()), 0.2)
    assert rel_err(fused(x), expected) < 1e-5
    assert int(fused.num_batches_tracked) == 3  # eval does not count batches
    assert launches["fwd_train"] == 3 and launches["bwd"] == 3 and launches["fwd_eval"] == 1


def test_channels_last_training_keeps_layout(launches, device):
    fused = bnbench.BatchNormAct2d(4, activation="gelu", device=device)
    compare_steps(fused, (2, 4, 3, 3), device, steps=2, activation="gelu", channels_last=True)
    y = fused(torch.randn(2, 4, 3, 3, device=device).to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert launches["fwd_train"] == 3


def test_affine_false_has_no_parameters(launches, device):
    fused = bnbench.BatchNormAct2d(3, affine=False, activation="sigmoid", device=device)
    assert fused.weight is None and fused.bias is None and not list(fused.parameters())
    compare_steps(fused, (2, 3, 2, 2), device, steps=2, activation="sigmoid")
    assert launches["fwd_train"] == 2 and launches["bwd"] == 2


def test_without_running_stats_eval_uses_batch_statistics(launches, device):
    fused = bnbench.BatchNormAct1d(3, track_running_stats=False, activation="tanh", device=device)
    assert fused.running_mean is None and fused.running_var is None and fused.num_batches_tracked is None
    fused.eval()
    x = torch.randn(5, 3, device=device) * 2 + 1
    expected = torch.tanh(nn.functional.batch_norm(x.double(), None, None, training=True))
    assert rel_err(fused(x), expected) < 1e-5
    assert launches["fwd_train"] == 1  # eval without running statistics normalises with the batch's


def test_eval_with_running_stats_backpropagates(launches, device):
    # a frozen BN (fine-tuning): gradients flow with the running statistics as constants
    fused = bnbench.BatchNormAct2d(3, activation="silu", device=device)
    with torch.no_grad():
        fused.running_mean.uniform_(-1, 1)
        fused.running_var.uniform_(0.5, 2)
    fused.eval()
    compare_steps(fused, (2, 3, 2, 3), device, steps=1, activation="silu")
    assert launches["fwd_eval"] == 1 and launches["bwd"] == 1


class _ConstantFills(TorchDispatchMode):
    """Records the aten ops that create or fill a tensor with a constant: how autograd materialises the zero
    gradient of an output that nothing differentiated (one fill kernel each on CUDA)."""

    FILLS = frozenset(("zeros", "zeros_like", "new_zeros", "zero_", "fill_", "full", "full_like", "new_full",
                       "ones", "ones_like", "new_ones"))  # fmt: skip

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.FILLS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("training", "memory_saving"),
    [(True, False), (True, True), (False, False)],  # batch statistics from x, from y; running statistics
)
def test_backward_materialises_no_zero_gradients(training, memory_saving, launches, device):
    """The autograd Function returns y only, so the batch mean and rstd it keeps get no zero gradients: a backward
    runs bnbench's backward kernels and no fill."""
    fused = bnbench.BatchNormAct2d(3, activation="leaky_relu", memory_saving=memory_saving, device=device)
    fused.train(training)
    x = torch.randn(4, 3, 2, 3, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    y = fused(x)
    with _ConstantFills() as fills:
        y.backward(grad)
    assert fills.seen == []
    assert launches["bwd_from_output" if memory_saving else "bwd"] == 1  # the Triton backward ran
    assert x.grad is not None and fused.weight.grad is not None and fused.bias.grad is not None


def test_state_dict_round_trip_with_nn_batchnorm2d(device):
    plain = nn.BatchNorm2d(5, device=device)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.running_mean.uniform_(-1, 1)
    plain.num_batches_tracked.fill_(7)
    fused = bnbench.BatchNormAct2d(5, device=device)
    fused.load_state_dict(plain.state_dict())  # strict: same keys, shapes, buffers
    back = nn.BatchNorm2d(5, device=device)
    back.load_state_dict(fused.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert set(fused.state_dict()) == set(plain.state_dict())


def test_drop_in_module_behaviour():
    m = bnbench.BatchNormAct2d(4, activation=bnbench.Activation.GELU_TANH, dtype=torch.float16)
    assert isinstance(m, nn.BatchNorm2d)
    assert m.weight.dtype == torch.float16
    assert "activation=gelu_tanh" in repr(m)
    assert "activation=leaky_relu, activation_param=0.3" in repr(bnbench.BatchNormAct1d(2, activation="leaky_relu",
                                                                                         activation_param=0.3))  # fmt: skip
    with torch.no_grad():
        m.weight.fill_(3.0)
        m.running_var.fill_(9.0)
    m.reset_parameters()
    assert torch.all(m.weight == 1) and torch.all(m.running_var == 1)
    clone = copy.deepcopy(m)
    assert clone.activation is bnbench.Activation.GELU_TANH


@pytest.mark.parametrize(
    ("cls", "shape", "match"),
    [
        (bnbench.BatchNormAct2d, (2, 3, 4), "expected 4D input"),
        (bnbench.BatchNormAct1d, (2, 3, 4, 4), "expected 2D or 3D input"),
    ],
)
def test_wrong_rank_raises_like_pytorch(cls, shape, match):
    with pytest.raises(ValueError, match=match):
        cls(3)(torch.randn(shape))


@pytest.mark.parametrize("activation, param", [("relu", None), ("gelu", None), ("leaky_relu", None),
                                               ("leaky_relu", 0.2)])  # fmt: skip
def test_parse_activation_accepts_its_own_output(activation, param):
    """Callers pass the (activation, parameter) pair a layer stores straight back: 0.0 means "no parameter" for
    an activation without one, so no caller needs ``param if act is LEAKY_RELU else None``."""
    parsed = parse_activation(activation, param)
    assert parse_activation(*parsed) == parsed
    assert parse_activation(parsed[0].value, parsed[1]) == parsed
    with pytest.raises(ValueError, match="takes no activation_param"):
        parse_activation(activation if param is None and activation != "leaky_relu" else "tanh", 0.5)


def test_errors_name_the_values(device):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnbench.BatchNormAct1d(3, device=device)(torch.randn(1, 3, device=device))
    with pytest.raises(ValueError, match=r"input has 4 channels .* running_mean has 3"):
        bnbench.BatchNormAct1d(3, device=device)(torch.randn(2, 4, device=device))
    with pytest.raises(ValueError, match="valid activations are: identity, relu, leaky_relu"):
        bnbench.BatchNormAct2d(3, activation="swish")
    with pytest.raises(ValueError, match="takes no activation_param"):
        bnbench.BatchNormAct2d(3, activation="relu", activation_param=0.1)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        bnbench.BatchNormAct2d(3, backend="cuda")
    with pytest.raises(TypeError, match=r"must be a str or bnbench\.Activation"):
        bnbench.BatchNormAct2d(3, activation=torch.relu)
    with pytest.raises(ValueError, match="running_mean and running_var must be defined"):
        bnbench.batch_norm_act(torch.randn(2, 3), None, None, training=False)


def test_triton_backend_never_falls_back_silently(monkeypatch):
    import bnbench.functional as functional

    cpu = torch.randn(4, 3)
    monkeypatch.setattr(functional, "_interpreter_active", lambda: False)
    with pytest.raises(ValueError, match='backend="triton" needs a CUDA tensor'):
        bnbench.batch_norm_act(cpu, None, None, training=True, backend="triton")
    assert functional.resolve_backend("auto", cpu) == "torch"
    monkeypatch.setattr(functional, "_interpreter_active", lambda: True)
    assert functional.resolve_backend("auto", cpu) == "triton"
    assert functional.resolve_backend("torch", cpu) == "torch"


def test_double_input_needs_the_torch_backend(device):
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        bnbench.batch_norm_act(x, None, None, training=True, backend="triton")
    m = bnbench.BatchNormAct1d(3, backend="torch", dtype=torch.float64, device=device)
    expected = torch.relu(nn.functional.batch_norm(x, None, None, training=True))
    assert rel_err(m(x), expected) < 1e-12


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_leaves_running_statistics_alone(momentum, device):
    fused = bnbench.BatchNormAct2d(3, momentum=momentum, device=device)
    plain = nn.BatchNorm2d(3, momentum=momentum, device=device)
    x = torch.randn(4, 3, 2, 2, device=device) * 2 + 5
    fused(x)
    plain(x)
    empty = torch.randn(0, 3, 2, 2, device=device)
    assert fused(empty).shape == empty.shape
    plain(empty)
    torch.testing.assert_close(fused.running_mean, plain.running_mean)
    torch.testing.assert_close(fused.running_var, plain.running_var)
    assert int(fused.num_batches_tracked) == int(plain.num_batches_tracked) == 2


def test_relu_propagates_nan_like_pytorch(device):
    x = torch.randn(4, 3, device=device)
    x[0, 0] = float("nan")
    y = bnbench.BatchNormAct1d(3, device=device)(x)
    expected = torch.relu(nn.BatchNorm1d(3, device=device)(x))
    assert torch.equal(y.isnan(), expected.isnan()) and y[:, 0].isnan().all()
