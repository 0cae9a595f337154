"""Memory-saving mode (``memory_saving=True``): backward from the saved output y instead of the input x.

Values and gradients against nn.BatchNorm + activation in float64; the kernels' split and fused paths against the
x-based backward kernels; the activations it refuses and why; the in-place misuse it must catch; a zero gamma; and
the memory held for backward on a stack of Linear -> BN -> activation blocks, counted on CPU with saved-tensor
hooks and measured on a GPU with torch.cuda memory statistics, against eager BN + activation. The sm_90 compile
check of the from-output kernel variants is in tests/test_kernels_compile.py (the registry's "from_output").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnbench
from bnbench import kernels
from bnbench.kernels import KernelConfig, launchers

#: fp32 relative-norm tolerance: rebuilding x_hat from y adds about one fp32 rounding of (|x_hat| + |b / w|)
RTOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def poisoned_launches(launches, monkeypatch):
    """The shared launch counter, with every launcher output allocation poisoned with NaN."""
    monkeypatch.setattr(launchers, "_alloc_like", lambda t: torch.full_like(t, float("nan")))
    return launches


def _reference(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """nn.BatchNorm + activation in float64 with the layer's state: (y, dx, dweight, dbias, running_var)."""
    bn = (nn.BatchNorm2d if x.dim() == 4 else nn.BatchNorm1d)(layer.num_features, affine=layer.affine).double()
    bn.load_state_dict(layer.state_dict())
    bn.train(layer.training)
    x64 = x.detach().double().requires_grad_()
    y = bn(x64)
    if layer.activation is bnbench.Activation.LEAKY_RELU:
        y = F.leaky_relu(y, layer.activation_param)
    y.backward(grad.double())
    grads = (bn.weight.grad, bn.bias.grad) if layer.affine else (None, None)
    return y, x64.grad, *grads, bn.running_var


CASES = [
    # (shape, activation, param, affine, channels_last): why
    ((4, 3, 5, 3), "leaky_relu", 0.1, True, False),  # C=3, S=15 not a tile multiple
    ((4, 3, 5, 3), "identity", None, True, True),  # channels_last strides
    ((16, 5), "leaky_relu", 0.01, True, False),  # BatchNorm1d (N, C), default slope
    ((2, 4, 7), "leaky_relu", 2.0, False, False),  # (N, C, L), no affine, slope > 1
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("shape", "activation", "param", "affine", "channels_last"), CASES)
def test_values_and_gradients_match_reference(backend, training, shape, activation, param, affine, channels_last,
                                               poisoned_launches, seed):  # fmt: skip
    cls = bnbench.BatchNormAct2d if len(shape) == 4 else bnbench.BatchNormAct1d
    layer = cls(shape[1], affine=affine, activation=activation, activation_param=param, backend=backend,
                memory_saving=True)  # fmt: skip
    with torch.no_grad():
        if affine:
            layer.weight.uniform_(-2.0, 2.0)  # negative gammas too: the inverse keeps the sign
            layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    layer.train(training)
    x = torch.randn(shape) * 3.0 + 1.0
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn(shape)
    y_ref, dx_ref, dw_ref, db_ref, rv_ref = _reference(layer, x, grad)
    y = layer(x)
    y.backward(grad)
    assert _rel_err(y, y_ref) < RTOL[torch.float32]
    assert _rel_err(x.grad, dx_ref) < RTOL[torch.float32]
    if affine:
        assert _rel_err(layer.weight.grad, dw_ref) < RTOL[torch.float32]
        assert _rel_err(layer.bias.grad, db_ref) < RTOL[torch.float32]
    assert _rel_err(layer.running_var, rv_ref) < 1e-6
    assert poisoned_launches["bwd"] == 0
    assert poisoned_launches["bwd_from_output"] == (1 if backend == "triton" else 0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("num_partials", [1, 3])  # the fused kernel, and reduce + combine + dx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_paths_match_the_input_based_backward(training, num_partials, dtype, poisoned_launches, seed):
    x = (torch.randn(6, 3, 5, 4) * 2 + 1).to(dtype)
    dy = torch.randn_like(x)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    act = {"activation": "leaky_relu", "act_param": 0.2}
    config = KernelConfig(2, 4, 8, num_partials=num_partials)
    if training:
        y, mean, rstd = kernels.bn_act_fwd_train(x, w, b, None, None, momentum=0.1, eps=1e-5, **act)
        saved = (mean, rstd)
    else:
        running_mean, running_var = torch.randn(3), torch.rand(3) + 0.5
        y = kernels.bn_act_fwd_eval(x, running_mean, running_var, w, b, eps=1e-5, **act)
        saved = (running_mean, running_var)
    expected = kernels.bn_act_bwd(dy, x, *saved, w, b, training=training, eps=1e-5, config=config, **act)
    got = kernels.bn_act_bwd_from_output(dy, y, saved[1], w, b, training=training, eps=1e-5, config=config, **act)
    # bf16: y is rounded to 8 bits before x_hat is rebuilt from it (the price of saving y in low precision)
    for name, g, e in zip(("dx", "dweight", "dbias"), got, expected, strict=True):
        assert not g.isnan().any(), name
        assert _rel_err(g, e) < RTOL[dtype], name


@pytest.mark.parametrize(
    ("activation", "param", "why"),
    [
        ("relu", None, "not invertible"),
        ("gelu", None, "not monotonic"),
        ("gelu_tanh", None, "not monotonic"),
        ("silu", None, "not monotonic"),
        ("sigmoid", None, "saturates"),
        ("tanh", None, "saturates"),
        ("leaky_relu", 0.0, "slope"),
        ("leaky_relu", -0.5, "slope"),
    ],
)
def test_unsound_activations_are_refused(activation, param, why):
    with pytest.raises(ValueError, match=why):
        bnbench.BatchNormAct2d(3, activation=activation, activation_param=param, memory_saving=True)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=why):
        bnbench.batch_norm_act(x, None, None, training=True, activation=activation, activation_param=param,
                               memory_saving=True)  # fmt: skip


def test_the_launcher_refuses_what_the_backward_from_the_output_cannot_use():
    """Before any kernel runs: a non-invertible activation, a floor for |w| that is not positive, a mean (the
    from-output kernels never read it), and no mean for the backward from the input."""
    y, dy, rstd = torch.randn(4, 3), torch.randn(4, 3), torch.rand(3) + 0.5
    common = {"training": True, "eps": 1e-5}
    with pytest.raises(ValueError, match="invertible"):
        kernels.bn_act_bwd_from_output(dy, y, rstd, None, None, activation="relu", **common)
    with pytest.raises(ValueError, match="invertible"):
        kernels.bn_act_bwd_from_output(dy, y, rstd, None, None, activation="leaky_relu", act_param=0.0, **common)
    with pytest.raises(ValueError, match="min_abs_weight"):
        kernels.bn_act_bwd_from_output(dy, y, rstd, None, None, activation="identity", min_abs_weight=0.0, **common)
    with pytest.raises(ValueError, match="mean=None"):
        kernels.bn_act_bwd(dy, y, torch.zeros(3), rstd, None, None, activation="identity", saved_output=True, **common)
    with pytest.raises(ValueError, match="needs the mean"):
        kernels.bn_act_bwd(dy, y, None, rstd, None, None, activation="identity", **common)


def test_relu_is_refused_because_its_gradient_needs_the_lost_input(seed):
    """The reason, shown: zeroing z where relu(z) == 0 (all y tells) changes dx at exactly those elements."""
    x = torch.randn(8, 3, requires_grad=True)
    grad = torch.randn(8, 3)
    F.relu(F.batch_norm(x, None, None, training=True)).backward(grad)
    z = F.batch_norm(x.detach(), None, None, training=True)
    x_hat_from_y = F.relu(z)  # what y = relu(z) can give back for x_hat (w=1, b=0)
    dz = grad * (z > 0)
    rstd = torch.rsqrt(x.detach().var(0, unbiased=False) + 1e-5)
    dx_from_y = rstd * (dz - dz.mean(0) - x_hat_from_y * (dz * x_hat_from_y).mean(0))
    assert not torch.allclose(dx_from_y, x.grad, atol=1e-3)
    off = z <= 0
    torch.testing.assert_close(dx_from_y[~off], x.grad[~off], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_modifying_the_output_in_place_is_caught(backend):
    layer = bnbench.BatchNormAct1d(3, activation="leaky_relu", backend=backend, memory_saving=True)
    x = torch.randn(4, 3, requires_grad=True)
    y = layer(x)
    y.add_(1.0)  # the saved output is what backward inverts: autograd's version counter must object
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_gamma_gives_finite_gradients(backend, seed):
    """x_hat cannot be rebuilt where gamma == 0 (y is constant there); |gamma| is floored, grads stay finite,
    and dx (which has a factor gamma) and dbias are still exact for that channel."""
    layer = bnbench.BatchNormAct1d(3, activation="leaky_relu", backend=backend, memory_saving=True)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 0.0, -0.5]))
        layer.bias.copy_(torch.tensor([0.1, 0.3, -0.2]))
    x = torch.randn(6, 3, requires_grad=True)
    grad = torch.randn(6, 3)
    _, dx_ref, dw_ref, db_ref, _ = _reference(layer, x, grad)
    layer(x).backward(grad)
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    torch.testing.assert_close(x.grad, dx_ref.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, db_ref.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad[[0, 2]], dw_ref.float()[[0, 2]], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Memory held for backward
# ---------------------------------------------------------------------------------------------------------------

BLOCKS, C = 4, 8


def _stack(kind: str, device: str = "cpu") -> nn.Sequential:
    """BLOCKS x (Linear -> BN + leaky_relu): eager pair, fused layer, or fused memory-saving layer."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers.append(nn.Linear(C, C, bias=False))
        if kind == "eager":
            layers += [nn.BatchNorm1d(C), nn.LeakyReLU(0.1)]
        else:
            layers.append(bnbench.BatchNormAct1d(C, activation="leaky_relu", activation_param=0.1,
                                                 memory_saving=kind == "memory_saving"))  # fmt: skip
    return nn.Sequential(*layers).to(device)


def _saved_activation_storages(model: nn.Module, x: torch.Tensor) -> int:
    """How many distinct activation-sized storages autograd holds for backward after a forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    activation_bytes = x.numel() * x.element_size()
    return sum(1 for nbytes in storages.values() if nbytes >= activation_bytes)


def test_saved_memory_on_a_stack_cpu_bookkeeping(seed):
    """Per block, eager keeps 3 activations (Linear's input, BN's input, the activation's input), the fused layer
    2 (Linear's and its own input), the memory-saving layer 1 (its output, which is the next Linear's input
    too); the model input adds one for the fused kinds' first Linear."""
    x = torch.randn(64, C, requires_grad=True)
    counts = {kind: _saved_activation_storages(_stack(kind), x) for kind in ("eager", "fused", "memory_saving")}
    assert counts == {"eager": 3 * BLOCKS, "fused": 2 * BLOCKS, "memory_saving": BLOCKS + 1}


@pytest.mark.slow  # two Inductor compilations
def test_saved_memory_survives_torch_compile(seed):
    """AOTAutograd's partitioner chooses what a compiled graph saves; it must still keep y, not x."""
    torch._dynamo.reset()
    x = torch.randn(64, C, requires_grad=True)
    counts = {}
    for kind in ("fused", "memory_saving"):
        compiled = torch.compile(_stack(kind), fullgraph=True)
        compiled(x)  # compile outside the hooks
        counts[kind] = _saved_activation_storages(compiled, x)
    torch._dynamo.reset()
    assert counts == {"fused": 2 * BLOCKS, "memory_saving": BLOCKS + 1}


@pytest.mark.gpu
def test_saved_memory_on_a_stack_cuda():
    """Bytes still allocated after the forward (what backward holds), with torch.cuda memory statistics."""
    x = torch.randn(1 << 16, C, device="cuda", requires_grad=True)
    activation_bytes = x.numel() * x.element_size()
    held = {}
    for kind in ("eager", "fused", "memory_saving"):
        model = _stack(kind, "cuda")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = model(x)
        torch.cuda.synchronize()
        held[kind] = (torch.cuda.memory_allocated() - before) / activation_bytes
        y.sum().backward()
        del y, model
    # output included: eager ~3 per block, fused ~2, memory-saving ~1 (plus the output and small vectors)
    assert held["memory_saving"] < held["fused"] < held["eager"], held
    assert held["memory_saving"] < BLOCKS + 1.5, held


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cumulative_momentum_matches_nn_batchnorm(backend, seed):
    """momentum=None (factor 1/num_batches_tracked on the device) composes with the memory-saving path."""
    layer = bnbench.BatchNormAct1d(3, momentum=None, activation="identity", backend=backend, memory_saving=True)
    reference = nn.BatchNorm1d(3, momentum=None)
    for step in range(3):
        x = torch.randn(6, 3) * (step + 1) + step
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-6, atol=1e-7)
    assert layer.num_batches_tracked.item() == 3
