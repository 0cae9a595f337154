"""Under torch.autocast the fused layer behaves as nn.BatchNorm + activation does: parameters, gradients and
running statistics stay fp32, the output takes the input's dtype (the low-precision output of the preceding conv,
or fp32 when the input is fp32), and the values agree with the eager pair under the same autocast.

CPU bf16 runs here (the Triton path under the interpreter, and the reference path); CUDA fp16/bf16 under ``gpu``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnbench
from bnbench import testing
from bnbench.functional import resolve_backend

#: the project's tolerance table, by the output's dtype: the eager pair rounds BN's output to it before the
#: activation, the fused layer rounds once, so they differ by about one rounding of that dtype
TOLERANCE = testing.TOLERANCE

ACTIVATIONS = {
    "relu": nn.ReLU(),
    "leaky_relu": nn.LeakyReLU(0.01),
    "gelu": nn.GELU(),
    "silu": nn.SiLU(),
    "tanh": nn.Tanh(),
}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _pair(activation: str, backend: str, device: torch.device):
    """(eager Conv -> BN2d -> act, the same with BatchNormAct2d), sharing initial weights."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)  # a bias before training BN has zero gradient: noise
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    fused_bn = bnbench.BatchNormAct2d(3, activation=activation, backend=backend)
    fused_bn.load_state_dict(bn.state_dict())
    eager = nn.Sequential(copy.deepcopy(conv), bn, copy.deepcopy(ACTIVATIONS[activation])).to(device)
    fused = nn.Sequential(copy.deepcopy(conv), fused_bn).to(device)
    return eager, fused


def _compare_under_autocast(eager, fused, x, device_type: str, dtype: torch.dtype, training: bool) -> None:
    eager.train(training)
    fused.train(training)
    with torch.autocast(device_type, dtype=dtype):
        y_ref = eager(x)
        y = fused(x)
    assert y.dtype == y_ref.dtype
    assert _rel_err(y, y_ref) < TOLERANCE[y.dtype]
    for layer_ref, layer in ((eager[1], fused[1]),):
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert getattr(layer, name).dtype == getattr(layer_ref, name).dtype == torch.float32, name
        if training:
            assert _rel_err(layer.running_mean, layer_ref.running_mean) < 1e-5
            assert _rel_err(layer.running_var, layer_ref.running_var) < 1e-5
    if not training:
        return
    grad = torch.randn_like(y_ref, dtype=torch.float32)
    y_ref.float().backward(grad)
    y.float().backward(grad)
    for (name, p_ref), p in zip(eager.named_parameters(), fused.parameters(), strict=True):
        assert p.grad.dtype == p_ref.grad.dtype == torch.float32, name
        assert _rel_err(p.grad, p_ref.grad) < 2 * TOLERANCE[y.dtype], name


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("training", [True, False])
def test_cpu_bf16_triton_path(activation, training, launches, seed):
    eager, fused = _pair(activation, "triton", torch.device("cpu"))
    x = torch.randn(2, 2, 4, 3)  # the conv's bf16 output (H*W=12, not a tile multiple) feeds the layer
    assert resolve_backend("triton", x) == "triton"
    _compare_under_autocast(eager, fused, x, "cpu", torch.bfloat16, training)
    assert launches["fwd_train" if training else "fwd_eval"] == 1


@pytest.mark.parametrize("training", [True, False])
def test_cpu_bf16_reference_path_is_bitwise_the_eager_pair(training, seed):
    eager, fused = _pair("gelu", "torch", torch.device("cpu"))
    x = torch.randn(2, 2, 4, 3)
    eager.train(training)
    fused.train(training)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fused(x), eager(x))


def test_fp32_input_under_autocast_stays_fp32(launches, seed):
    """A BN whose input is fp32 (no low-precision op before it) keeps fp32, as nn.BatchNorm does."""
    layer = bnbench.BatchNormAct2d(3, activation="relu", backend="triton")
    reference = nn.BatchNorm2d(3)
    x = torch.randn(2, 3, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = layer(x), torch.relu(reference(x))
    assert y.dtype == y_ref.dtype == torch.float32
    assert _rel_err(y, y_ref) < TOLERANCE[torch.float32]
    assert launches["fwd_train"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("training", [True, False])
def test_cuda_autocast(dtype, activation, training, launches, seed):
    eager, fused = _pair(activation, "triton", torch.device("cuda"))
    x = torch.randn(8, 2, 16, 16, device="cuda")
    _compare_under_autocast(eager, fused, x, "cuda", dtype, training)
    assert launches["fwd_train" if training else "fwd_eval"] == 1


@pytest.mark.parametrize("training", [True, False])
def test_cpu_bf16_with_a_residual(training, launches, seed):
    """A ResNet block's tail under autocast: the residual is the bf16 output of the shortcut's conv, as in the eager
    relu(bn(conv(x)) + shortcut(x)); a residual of another dtype than the input is a TypeError naming both."""
    eager, fused = _pair("relu", "triton", torch.device("cpu"))
    shortcut = nn.Conv2d(2, 3, 1, bias=False)
    x = torch.randn(2, 2, 4, 3)
    eager.train(training)
    fused.train(training)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = shortcut(x)
        y_ref = eager[2](eager[1](eager[0](x)) + r)
        y = fused[1](fused[0](x), r)
        assert y.dtype == y_ref.dtype == r.dtype == torch.bfloat16
        with pytest.raises(TypeError, match=r"residual has dtype torch\.float32 but input has dtype torch\.bfloat16"):
            fused[1](fused[0](x), r.float())
    assert _rel_err(y, y_ref) < TOLERANCE[torch.bfloat16]
    assert launches["fwd_train" if training else "fwd_eval"] == 1
