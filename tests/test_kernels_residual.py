"""act(BN(x) + residual) through the Triton kernels against float64 nn.BatchNorm + add + activation.

Each test runs the kernels (under the interpreter on CPU) and proves it: the ``kernels_ran`` fixture records every
launch and its HAS_RESIDUAL switch, and poisons the launchers' outputs with NaN, so a gradient of the residual that
no kernel writes fails the comparison. Three launch paths (``path``): the register-resident small path, the small
path looping over tiles, and the split reduction with tiny ragged tiles (several partials, masks on every axis).

Shapes are tiny (the interpreter simulates every program): (4, 3, 5) is (N, C, L) with C not a power of two; (2, 3,
3, 4) is (N, C, H, W), so channels_last and NCHW address it differently; 2-D (6, 5) has S = 1 and its transposed
view a unit N stride.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import bnbench
from bnbench.testing import reference, rel_err, tolerance

ALL_ACTIVATIONS = [a.value for a in bnbench.Activation]
#: the kernels that take a residual (the statistics kernel reads x alone)
RESIDUAL_KERNELS = {
    "_bn_act_fwd_apply_kernel",
    "_bn_act_fwd_fused_kernel",
    "_bn_act_bwd_reduce_kernel",
    "_bn_act_bwd_dx_kernel",
    "_bn_act_bwd_fused_kernel",
}


@pytest.fixture
def kernels_ran(monkeypatch):
    """{kernel name: [HAS_RESIDUAL of each launch]}; the launchers' outputs are filled with NaN first."""
    from bnbench.kernels import launchers

    seen: dict[str, list] = {}
    launch = launchers._launch

    def recording(kernel, grid, *args, **kwargs):
        seen.setdefault(kernel.__name__, []).append(kwargs.get("HAS_RESIDUAL"))
        launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launchers, "_launch", recording)
    monkeypatch.setattr(launchers, "_alloc_like", lambda t: torch.full_like(t, float("nan")))
    return seen


#: the plan each path forces (None: the heuristic's, which for these shapes is register-resident)
PATHS = {
    "resident": None,
    "looping": dict(block_size_n=2, block_size_c=2, num_partials=1),
    "split": dict(block_size_n=2, block_size_c=2, num_partials=3),
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    forced = PATHS[request.param]
    if forced is not None:
        from bnbench.kernels import launchers

        original = launchers.default_config

        def config(geom, strides, element_size, device):
            cfg = original(geom, strides, element_size, device)
            return dataclasses.replace(cfg, block_size_s=4 if geom.S > 1 else 1, **forced)

        monkeypatch.setattr(launchers, "default_config", config)
    return request.param


#: the kernels each path launches, training forward and backward (eval: the apply kernel, and the backward's
#: reduce kernel on the split path, its fused kernel otherwise)
EXPECTED = {
    ("resident", True): {"_bn_act_fwd_fused_kernel", "_bn_act_bwd_fused_kernel"},
    ("looping", True): {"_bn_act_fwd_fused_kernel", "_bn_act_bwd_fused_kernel"},
    ("split", True): {
        "_bn_act_fwd_stats_kernel",
        "_bn_act_fwd_apply_kernel",
        "_bn_act_bwd_reduce_kernel",
        "_bn_act_bwd_dx_kernel",
    },
    ("resident", False): {"_bn_act_fwd_apply_kernel", "_bn_act_bwd_fused_kernel"},
    ("looping", False): {"_bn_act_fwd_apply_kernel", "_bn_act_bwd_fused_kernel"},
    ("split", False): {"_bn_act_fwd_apply_kernel", "_bn_act_bwd_reduce_kernel"},
}


def make(shape, layout, dtype=torch.float32, offset=0.5):
    """A random tensor of ``shape`` in a memory layout: contiguous, channels_last, strided (every other element
    of a wider last axis), transposed (2-D with a unit N stride) or offset (one element into its storage)."""
    if layout == "transposed":
        return (torch.randn(shape[::-1]) * 2 + offset).to(dtype).t()
    if layout == "strided":
        return (torch.randn(*shape[:-1], 2 * shape[-1]) * 2 + offset).to(dtype)[..., ::2]
    if layout == "offset":
        n = torch.Size(shape).numel()
        return (torch.randn(n + 1) * 2 + offset).to(dtype)[1:].view(shape)
    t = (torch.randn(shape) * 2 + offset).to(dtype)
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t


def _cancelling_terms_norm(x, grad_out, weight, running_var, training, eps=1e-5):
    """||grad_out * w * rstd||: the scale of the terms of dx, which can cancel almost entirely (N=2)."""
    dims = [d for d in range(x.dim()) if d != 1]
    var = x.double().var(dim=dims, unbiased=False) if training else running_var.double()
    shape = [1, -1] + [1] * (x.dim() - 2)
    terms = grad_out.double() * weight.double().view(shape) * (var + eps).rsqrt().view(shape)
    return max(terms.norm().item(), 1e-30)


def check(x, residual, *, activation="relu", training=True, track=True):
    """Forward + backward through the Triton path with a residual, against the float64 reference: y, the running
    statistics, and the gradients of x, the residual, weight and bias."""
    C = x.shape[1]
    weight, bias = torch.rand(C) + 0.5, torch.randn(C) * 0.5
    rm, rv = (torch.randn(C) * 0.1, torch.rand(C) + 0.5) if track else (None, None)
    grad_out = torch.randn(x.shape).to(x.dtype)
    ref = reference(x, rm, rv, weight, bias, training=training, activation=activation, grad_output=grad_out,
                    residual=residual)  # fmt: skip
    xg, rg = x.detach().requires_grad_(), residual.detach().requires_grad_()
    wg, bg = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    y = bnbench.batch_norm_act(xg, rm, rv, wg, bg, training, activation=activation, backend="triton", residual=rg)
    y.backward(grad_out)
    tol = tolerance(x.dtype)
    assert y.dtype == x.dtype and rg.grad.dtype == residual.dtype
    assert rel_err(y, ref.y) < tol, ("y", rel_err(y, ref.y))
    dx_err = (xg.grad.double() - ref.grad_input).norm().item() / _cancelling_terms_norm(x, grad_out, weight, rv,
                                                                                      training)  # fmt: skip
    assert dx_err < tol, ("dx", dx_err)
    assert rel_err(rg.grad, ref.grad_residual) < tol, ("dresidual", rel_err(rg.grad, ref.grad_residual))
    assert rel_err(wg.grad, ref.grad_weight) < tol, ("dweight", rel_err(wg.grad, ref.grad_weight))
    assert rel_err(bg.grad, ref.grad_bias) < tol, ("dbias", rel_err(bg.grad, ref.grad_bias))
    if track:
        assert rel_err(rm, ref.running_mean) < 1e-5 and rel_err(rv, ref.running_var) < 1e-5
    return xg.grad, rg.grad


def _assert_ran(kernels_ran, path, training):
    assert set(kernels_ran) == EXPECTED[path, training], kernels_ran
    for name, switches in kernels_ran.items():
        assert all(switches) if name in RESIDUAL_KERNELS else switches == [None] * len(switches), (name, switches)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_every_activation(activation, training, path, kernels_ran):
    # (N, C, L) with a residual of other strides than x (a strided view): every path reads it through its own
    check(make((4, 3, 5), "contiguous"), make((4, 3, 5), "strided"), activation=activation, training=training)
    _assert_ran(kernels_ran, path, training)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("shape", "x_layout", "r_layout"),
    [
        ((2, 3, 3, 4), "channels_last", "contiguous"),  # ResNet's case under channels_last: an NCHW identity
        ((2, 3, 3, 4), "contiguous", "channels_last"),
        ((2, 3, 3, 4), "strided", "offset"),  # H and W do not merge in x: the split-S addressing of both
        ((6, 5), "transposed", "contiguous"),  # S = 1, N the unit-stride axis of x only
    ],
)
def test_layouts(shape, x_layout, r_layout, training, path, kernels_ran):
    check(make(shape, x_layout), make(shape, r_layout), activation="silu", training=training)
    _assert_ran(kernels_ran, path, training)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision(dtype, training, path, kernels_ran):
    # fp32 statistics and math, the input's dtype for y and both input gradients (tolerances of bnbench.testing)
    check(make((2, 3, 3, 4), "channels_last", dtype), make((2, 3, 3, 4), "contiguous", dtype), activation="gelu",
          training=training)  # fmt: skip
    _assert_ran(kernels_ran, path, training)


def test_without_running_statistics(path, kernels_ran):
    check(make((4, 3, 5), "contiguous"), make((4, 3, 5), "contiguous"), activation="leaky_relu", track=False)


def test_gradients_are_bitwise_reproducible(path, kernels_ran):
    x, r = make((4, 3, 5), "contiguous"), make((4, 3, 5), "strided")
    torch.manual_seed(7)
    first = [g.clone() for g in check(x, r, activation="tanh")]
    torch.manual_seed(7)  # the same parameters and grad_out again
    second = check(x, r, activation="tanh")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("training", [True, False])
def test_residual_gradient_takes_the_residual_layout(training, path, kernels_ran):
    """The launcher writes dz once into a tensor laid out as the residual (channels_last here, x contiguous)."""
    from bnbench import kernels

    x, r = make((2, 3, 3, 4), "contiguous"), make((2, 3, 3, 4), "channels_last")
    dy = torch.randn(x.shape)
    w, b, rm, rv = torch.rand(3) + 0.5, torch.randn(3), torch.zeros(3), torch.ones(3)
    if training:
        y, mean, rstd = kernels.bn_act_fwd_train(x, w, b, None, None, momentum=0.1, eps=1e-5, activation="relu",
                                                 residual=r)  # fmt: skip
    else:
        y, mean, rstd = kernels.bn_act_fwd_eval(x, rm, rv, w, b, eps=1e-5, activation="relu", residual=r), rm, rv
    dx, _, _, dr = kernels.bn_act_bwd(dy, x, mean, rstd, w, b, training=training, eps=1e-5, activation="relu",
                                      residual=r)  # fmt: skip
    assert dr.stride() == r.stride() and dx.stride() == x.stride()
    assert torch.equal(dr, torch.where(y > 0, dy, 0.0))  # relu: dz = dy where z > 0, written once, exactly


def test_bad_residual_is_refused_by_the_launchers():
    from bnbench import kernels

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"residual \(4, 3\) torch.float16 on cpu does not match input"):
        kernels.bn_act_fwd_train(x, None, None, None, None, momentum=0.1, eps=1e-5, activation="relu",
                                 residual=x.half())  # fmt: skip
    with pytest.raises(ValueError, match="the backward from the output takes no residual"):
        kernels.bn_act_bwd(x, x, None, torch.ones(3), None, None, training=True, eps=1e-5, activation="identity",
                           saved_output=True, residual=x)  # fmt: skip


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn()`` builds its graph."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_memory_held_for_backward():
    """What is saved for backward, measured: x and the residual (z is rebuilt from both; README, "Residual"),
    plus O(C) statistics and parameters, as much as the eager F.batch_norm + add + relu keeps (x and relu's
    output); without a residual x alone."""
    N, C, H, W = 2, 3, 4, 4
    x = torch.randn(N, C, H, W, requires_grad=True)
    r = torch.randn(N, C, H, W, requires_grad=True)
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    tensor, channels = x.numel() * 4, C * 4

    def fused(residual):
        return lambda: bnbench.batch_norm_act(x, None, None, w, b, True, backend="triton", residual=residual)

    eager = _saved_bytes(lambda: F.relu(F.batch_norm(x, None, None, w, b, True) + r))
    assert _saved_bytes(fused(r)) == 2 * tensor + 4 * channels  # x, r; weight, bias, mean, rstd
    assert _saved_bytes(fused(None)) == tensor + 4 * channels
    assert eager >= 2 * tensor


@pytest.mark.parametrize("training", [True, False])
def test_second_derivatives_and_jvp_match_the_torch_path(training, kernels_ran):
    """create_graph=True (backward as differentiable PyTorch ops, residual included) and forward-mode AD give the
    torch backend's values."""
    import torch.autograd.forward_ad as fwAD

    def run(backend):
        torch.manual_seed(0)
        x, r = torch.randn(4, 3, 5, requires_grad=True), torch.randn(4, 3, 5, requires_grad=True)
        w = (torch.rand(3) + 0.5).requires_grad_()
        rm, rv = torch.zeros(3), torch.ones(3)
        y = bnbench.batch_norm_act(x, rm, rv, w, None, training, activation="silu", backend=backend, residual=r)
        dx, dr = torch.autograd.grad(y, (x, r), torch.ones_like(y), create_graph=True)
        second = torch.autograd.grad((dx.square().sum() + dr.square().sum()), (x, r, w))
        with fwAD.dual_level():
            tangents = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
            xd, rd = (fwAD.make_dual(t.detach(), u) for t, u in zip((x, r), tangents, strict=True))
            yd = bnbench.batch_norm_act(xd, rm.clone(), rv.clone(), w.detach(), None, training, activation="silu",
                                        backend=backend, residual=rd)  # fmt: skip
            tangent = fwAD.unpack_dual(yd).tangent
        return (dx, dr, *second, tangent)

    for got, expected in zip(run("triton"), run("torch"), strict=True):
        assert rel_err(got, expected) < 1e-4
    assert kernels_ran  # the Triton path ran
