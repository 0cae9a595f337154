"""CUDA graphs: a fused layer's training step (forward and backward, running-statistics update included) and its
eval forward are capturable, and replays give what eager steps give.

Capturable means no host synchronisation (``momentum=None`` keeps its factor on the device) and the same
allocations on every run. Checked directly with ``torch.cuda.set_sync_debug_mode("error")``, and by capture and
replay with ``torch.cuda.graph``. GPU only (the ``gpu`` marker); the CPU-side guarantee that a step has no
data-dependent host code is ``fullgraph=True`` compilation in ``test_compile.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import bnbench

pytestmark = pytest.mark.gpu

SHAPE = (8, 6, 10, 12)  # C=6 not a power of two; H*W=120 not a tile multiple


def _layer(momentum, memory_saving: bool) -> bnbench.BatchNormAct2d:
    torch.manual_seed(0)
    layer = bnbench.BatchNormAct2d(SHAPE[1], momentum=momentum, activation="leaky_relu", activation_param=0.1,
                                   backend="triton", memory_saving=memory_saving)  # fmt: skip
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    return layer.cuda()


def _eager_step(layer, x, grad, residual=None):
    """(y, dx) of one training step; with a residual (act(BN(x) + residual)) also its gradient."""
    for p in layer.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    if residual is None:
        y = layer(x)
        y.backward(grad)
        return y.detach(), x.grad
    r = residual.clone().requires_grad_()
    y = layer(x, r)
    y.backward(grad)
    return y.detach(), x.grad, r.grad


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("memory_saving", [False, True])
def test_training_step_has_no_host_sync(momentum, memory_saving, launches):
    layer = _layer(momentum, memory_saving)
    x = torch.randn(SHAPE, device="cuda")
    _eager_step(layer, x, torch.randn_like(x))  # compile the kernels first (compilation may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _eager_step(layer, x, torch.ones_like(x))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert launches["fwd_train"] == 2
    assert launches["bwd_from_output" if memory_saving else "bwd"] == 2


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("memory_saving", "residual"), [(False, False), (True, False), (False, True)])
def test_graphed_training_step_matches_eager(momentum, memory_saving, residual, launches):
    layer = _layer(momentum, memory_saving)
    eager = copy.deepcopy(layer)
    static_x = torch.randn(SHAPE, device="cuda", requires_grad=True)
    static_grad = torch.randn(SHAPE, device="cuda")
    # act(BN(x) + residual) with an NCHW residual beside a channels_last x: read and its gradient written in place
    static_r = torch.randn(SHAPE, device="cuda", requires_grad=True) if residual else None
    if residual:
        static_x = static_x.detach().to(memory_format=torch.channels_last).requires_grad_()
    args = (static_x,) if static_r is None else (static_x, static_r)
    detached = lambda: () if static_r is None else (static_r.detach(),)  # noqa: E731

    # Warm up on a side stream (kernel compilation, autograd state), mirrored on the eager copy.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _eager_step(layer, static_x.detach(), static_grad, *detached())
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        _eager_step(eager, static_x.detach(), static_grad, *detached())

    for p in layer.parameters():
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(*args)
        static_y.backward(static_grad)

    torch.manual_seed(1)
    for step in range(3):
        x = torch.randn(SHAPE, device="cuda") * (step + 1) + step
        grad = torch.randn(SHAPE, device="cuda")
        with torch.no_grad():
            static_x.copy_(x)
            static_grad.copy_(grad)
            if static_r is not None:
                static_r.copy_(torch.randn(SHAPE, device="cuda"))
        graph.replay()
        x_eager = x.to(memory_format=torch.channels_last) if residual else x
        y_ref, dx_ref, *dr_ref = _eager_step(eager, x_eager, grad, *detached())
        torch.testing.assert_close(static_y, y_ref, rtol=0, atol=0)
        torch.testing.assert_close(static_x.grad, dx_ref, rtol=0, atol=0)
        if static_r is not None:
            torch.testing.assert_close(static_r.grad, dr_ref[0], rtol=0, atol=0)
        torch.testing.assert_close(layer.weight.grad, eager.weight.grad, rtol=0, atol=0)
        torch.testing.assert_close(layer.bias.grad, eager.bias.grad, rtol=0, atol=0)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(layer, name), getattr(eager, name), rtol=0, atol=0, msg=name)
    assert layer.num_batches_tracked.item() == 3 + 3  # warm-up steps plus replays (capture itself runs nothing)
    assert launches["fwd_train"] > 0


def test_graphed_eval_forward_matches_eager(launches):
    layer = _layer(0.1, False).eval()
    static_x = torch.randn(SHAPE, device="cuda")
    with torch.no_grad():
        layer(static_x)  # compile
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        x = torch.randn(SHAPE, device="cuda")
        static_x.copy_(x)
        graph.replay()
        torch.testing.assert_close(static_y, layer(x), rtol=0, atol=0)
    assert launches["fwd_eval"] >= 2
