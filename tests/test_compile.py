"""torch.compile(fullgraph=True) of models containing BatchNormAct1d/2d, on CPU: the reference path
(backend="torch", compiled natively by Inductor) and the Triton path (custom ops, kernels under the interpreter).

Every case checks outputs, input and parameter gradients and every buffer (running statistics and
num_batches_tracked) against the same model run eagerly, over several steps, and that Dynamo produced one graph
per mode (no graph break, no recompilation from step to step, which a host-side ``momentum=None`` factor would
cause).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import bnbench
from bnbench.functional import resolve_backend


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(backend: str, momentum: float | None, memory_saving: bool) -> nn.Module:
    """Conv -> BNAct2d -> Linear -> BNAct1d: both modules, both ranks, a parameterised activation."""
    torch.manual_seed(0)
    second_act = dict(activation="leaky_relu", activation_param=0.2) if memory_saving else dict(activation="gelu")
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        bnbench.BatchNormAct2d(3, momentum=momentum, activation="silu", backend=backend),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
        bnbench.BatchNormAct1d(4, momentum=momentum, backend=backend, memory_saving=memory_saving, **second_act),
    )


def _step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(grad)
    return y.detach(), x.grad


@pytest.mark.slow  # Inductor compiles two graphs per case (about 10-30 s each on a CPU)
@pytest.mark.parametrize(
    ("backend", "momentum", "memory_saving"),
    [
        ("torch", 0.1, False),  # reference composition, compiled natively
        ("torch", None, True),  # cumulative average (a device tensor: no graph break), memory-saving Function
        ("triton", 0.1, False),  # custom ops + autograd.Function, kernels under the interpreter on CPU
        ("triton", None, True),  # cumulative average and the memory-saving backward op
    ],
)
def test_fullgraph_compile_matches_eager(backend, momentum, memory_saving, launches):
    eager = _model(backend, momentum, memory_saving)
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    torch.manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 2, 3, 3) * (step + 1) + step  # statistics change from step to step
        grad = torch.randn(4, 4)
        for p in (*eager.parameters(), *compiled_model.parameters()):
            p.grad = None
        y_ref, dx_ref = _step(eager, x, grad)
        y, dx = _step(compiled, x, grad)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
        for (name, p_ref), p in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=name)
        for (name, b_ref), b in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-7, msg=name)
    assert compiled_model[1].num_batches_tracked.item() == 3
    assert counter.frame_count == 1, "training steps must share one graph (no break, no recompilation)"

    eager.eval()
    compiled_model.eval()
    x = torch.randn(4, 2, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 2  # eval mode is its own graph

    if backend == "triton":
        assert resolve_backend("auto", x) == "triton"
        # 2 layers x 3 steps x (eager + compiled), plus compile-time runs are not launches (fake tensors)
        assert launches["fwd_train"] == 12
        assert launches["fwd_eval"] == 4
        # the BNAct1d layer's backward runs from its output in memory-saving mode
        assert launches["bwd"] == (6 if memory_saving else 12)
        assert launches["bwd_from_output"] == (6 if memory_saving else 0)


def test_momentum_none_matches_nn_batchnorm_in_compiled_model():
    """The device-side cumulative factor gives nn.BatchNorm's running statistics (up to fp32 rounding)."""
    torch.manual_seed(0)
    fused = bnbench.BatchNormAct2d(3, momentum=None, activation="identity", backend="torch")
    reference = nn.BatchNorm2d(3, momentum=None)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    for step in range(4):
        x = torch.randn(5, 3, 2, 2) + step
        torch.testing.assert_close(compiled(x), reference(x))
    torch.testing.assert_close(fused.running_mean, reference.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused.running_var, reference.running_var, rtol=1e-6, atol=1e-7)
    assert fused.num_batches_tracked.item() == reference.num_batches_tracked.item() == 4


class _ResidualBlock(nn.Module):
    """The tail of a ResNet block: relu(bn(conv(x)) + x), with the fused layer taking the residual."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = bnbench.BatchNormAct2d(3, momentum=None, activation="relu", backend=backend)

    def forward(self, x):
        return self.bn(self.conv(x), x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile_with_a_residual(backend, launches):
    """act(BN(x) + residual) compiles into one graph per mode (the custom ops take the optional residual, their fake
    implementations give its gradient's metadata): outputs, input and parameter gradients and buffers as eager."""
    torch.manual_seed(0)
    eager = _ResidualBlock(backend)
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    for step in range(2):
        x = torch.randn(2, 3, 3, 3) + step
        grad = torch.randn(2, 3, 3, 3)
        y_ref, dx_ref = _step(eager, x, grad)
        y, dx = _step(compiled, x, grad)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)  # through the conv and the residual
        for (name, p_ref), p in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=name)
            p.grad = p_ref.grad = None
        for (name, b_ref), b in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-7, msg=name)
    assert counter.frame_count == 1
    eager.eval()
    compiled_model.eval()
    x = torch.randn(2, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    if backend == "triton":
        assert launches["fwd_train"] == 4 and launches["bwd"] == 4 and launches["fwd_eval"] == 2
