"""The Triton kernels through ``batch_norm_act(..., backend="triton")`` against the float64 reference.

On CPU these run under the Triton interpreter (tests/conftest.py), natively on a GPU. Every test here uses the
``triton_spy`` fixture, which proves the Triton launchers ran and poisons their outputs with NaN so an element a
kernel forgets to write fails the comparison. Shapes are tiny on purpose (the interpreter simulates each program).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import bnbench
from bnbench.testing import reference, rel_err, tolerance

ALL_ACTIVATIONS = [a.value for a in bnbench.Activation]
LOW_PRECISION = [torch.float16, torch.bfloat16]


@pytest.fixture
def triton_spy(monkeypatch):
    """Counts the Triton launchers' output allocations and fills them with NaN before the kernels run."""
    from bnbench.kernels import launchers

    calls = []

    def poisoned(t):
        calls.append(tuple(t.shape))
        return torch.full_like(t, float("nan"))

    monkeypatch.setattr(launchers, "_alloc_like", poisoned)
    return calls


@pytest.fixture(params=["heuristic", "split"])
def path(request, monkeypatch):
    """Run each test on the default launch plan and on a forced split reduction with tiny, ragged tiles
    (several partials per channel, a combine step, masks on every axis)."""
    if request.param == "split":
        from bnbench.kernels import launchers

        original = launchers.default_config

        def tiny_split(geom, strides, element_size, device):
            cfg = original(geom, strides, element_size, device)
            return dataclasses.replace(
                cfg,
                block_size_n=2,
                block_size_c=2,
                block_size_s=4 if geom.S > 1 else 1,
                num_partials=3,
            )

        monkeypatch.setattr(launchers, "default_config", tiny_split)
    return request.param


def make_input(shape, dtype, device, layout="contiguous", offset=0.5, scale=2.0):
    """Fresh random input (never zeros) in the requested memory layout."""
    if layout == "transposed":  # (N, C) whose N axis has unit stride
        return (torch.randn(shape[::-1], device=device) * scale + offset).to(dtype).t()
    if layout in ("strided", "cropped"):
        wide = (torch.randn(*shape[:-1], 2 * shape[-1], device=device) * scale + offset).to(dtype)
        # strided: every other element of the last axis; cropped: its first half (for 4-D input, H and W
        # then cannot merge into one strided axis and the kernels address S as (s // W, s % W))
        return wide[..., ::2] if layout == "strided" else wide[..., : shape[-1]]
    x = (torch.randn(shape, device=device) * scale + offset).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x


def params(C, device, dtype=torch.float32):
    weight = (torch.rand(C, device=device) + 0.5).to(dtype)
    bias = (torch.randn(C, device=device) * 0.5).to(dtype)
    running_mean = (torch.randn(C, device=device) * 0.1).to(dtype)
    running_var = (torch.rand(C, device=device) + 0.5).to(dtype)
    return weight, bias, running_mean, running_var


def _cancelling_terms_norm(x, grad_out, weight, running_var, training=True, eps=1e-5):
    """||grad_out * w * rstd|| in float64, the scale of each term of dx (rstd of the batch, or running)."""
    x64 = x.double()
    dims = [d for d in range(x.dim()) if d != 1]
    var = x64.var(dim=dims, unbiased=False) if training else running_var.double()
    shape = [1, -1] + [1] * (x.dim() - 2)
    w = 1.0 if weight is None else weight.double().view(shape)
    terms = grad_out.double() * w * (var + eps).rsqrt().view(shape)
    return max(terms.norm().item(), 1e-30)


def run_and_check(
    x, *, activation="relu", training=True, affine=True, track=True, param_dtype=torch.float32, momentum=0.1
):
    """Forward + backward through the Triton path; compare everything with the float64 reference."""
    C = x.shape[1]
    weight, bias, rm, rv = params(C, x.device, param_dtype)
    if not affine:
        weight = bias = None
    if not track:
        rm = rv = None
    grad_out = torch.randn(x.shape, device=x.device).to(x.dtype)
    ref = reference(
        x, rm, rv, weight, bias, training=training, momentum=momentum, activation=activation, grad_output=grad_out
    )
    xg = x.detach().requires_grad_(True)
    wg = None if weight is None else weight.detach().clone().requires_grad_(True)
    bg = None if bias is None else bias.detach().clone().requires_grad_(True)
    y = bnbench.batch_norm_act(
        xg, rm, rv, wg, bg, training=training, momentum=momentum, activation=activation, backend="triton"
    )
    y.backward(grad_out)

    tol = tolerance(x.dtype)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert xg.grad.dtype == x.dtype
    assert rel_err(y, ref.y) < tol, ("y", rel_err(y, ref.y))
    # dx = w*rstd*(dz - mean(dz) - x_hat*mean(dz*x_hat)) can cancel almost entirely (N=2: x_hat = +-1), so its
    # error is measured against the size of the terms that cancel, not against the (possibly tiny) result.
    dx_err = (xg.grad.double() - ref.grad_input).norm().item() / _cancelling_terms_norm(
        x, grad_out, weight, rv, training
    )
    assert dx_err < tol, ("dx", dx_err)
    if affine:
        # weight/bias gradients are fp32 sums stored in the parameters' dtype
        ptol = max(tol, tolerance(param_dtype))
        assert wg.grad.dtype == param_dtype
        assert rel_err(wg.grad, ref.grad_weight) < ptol, ("dweight", rel_err(wg.grad, ref.grad_weight))
        assert rel_err(bg.grad, ref.grad_bias) < ptol, ("dbias", rel_err(bg.grad, ref.grad_bias))
    if track:
        stat_tol = tolerance(param_dtype) if param_dtype != torch.float32 else 1e-5
        assert rm.dtype == param_dtype
        assert rel_err(rm, ref.running_mean) < stat_tol
        assert rel_err(rv, ref.running_var) < stat_tol
    return y


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_every_activation_training_forward_and_backward(activation, triton_spy, path, device):
    # C=3 (not a power of two), N=6: a small BN1d batch
    run_and_check(make_input((6, 3), torch.float32, device), activation=activation)
    assert triton_spy, "the Triton launchers did not run"


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_every_activation_eval_forward_and_backward(activation, triton_spy, path, device):
    # eval: running statistics are constants; (N, C, L) input with L=5
    run_and_check(make_input((3, 3, 5), torch.float32, device), activation=activation, training=False)
    assert triton_spy


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((5, 1), "contiguous"),  # C=1, odd N
        ((2, 4), "contiguous"),  # N=2: the smallest training batch
        ((7, 3), "transposed"),  # (N, C) with the batch axis contiguous
        ((3, 3, 7), "contiguous"),  # (N, C, L), L not a power of two
        ((2, 3, 1), "contiguous"),  # (N, C, L) with S=1
        ((2, 3, 5, 3), "contiguous"),  # NCHW, S=15 not a multiple of any tile
        ((2, 3, 5, 3), "channels_last"),  # NHWC strides: rows merge, C has unit stride
        ((2, 3, 4, 3), "strided"),  # a 4-D view with stride 2 along W (H and W still merge)
        ((2, 3, 4, 3), "cropped"),  # a 4-D view whose H and W do not merge (split S addressing)
        ((3, 2, 5), "strided"),  # (N, C, L) view with stride 2 along L
    ],
)
def test_layouts_without_copies(shape, layout, triton_spy, path, device):
    x = make_input(shape, torch.float32, device, layout)
    y = run_and_check(x, activation="leaky_relu")
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    elif layout in ("contiguous", "transposed"):
        assert y.stride() == x.stride()
    assert triton_spy


def _small_s_input(shape, layout, dtype, device):
    """NCHW (contiguous) or a channel-sliced view of it (S still has unit stride; N and C strides are not N*C*S
    and S), or a view with stride 2 along W."""
    if layout == "channel_slice":
        N, C, H, W = shape
        return make_input((N, 2 * C, H, W), dtype, device)[:, ::2]
    return make_input(shape, dtype, device, layout)


@pytest.mark.parametrize(
    ("shape", "layout", "flat_rows", "align"),
    [
        ((3, 5, 7, 7), "contiguous", True, 1),  # S = 49: (n, s) flattened into one row axis
        ((3, 5, 7, 7), "channel_slice", True, 1),
        ((3, 5, 7, 7), "strided", False, 1),  # S has stride 2: tiles along S as before
        ((2, 3, 14, 14), "contiguous", False, 4),  # S = 196: per-image tiles, S % 4 == 0 told to the compiler
        ((2, 3, 14, 14), "channel_slice", False, 4),
        ((2, 3, 14, 14), "cropped", False, 1),  # split S addressing: no hint
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_nchw_small_spatial_tiling(shape, layout, flat_rows, align, dtype, training, triton_spy, path, device):
    """Issue 12 item 5: NCHW with a small S not a multiple of 16 (ResNet-50's 7x7 and 14x14), every pass."""
    from bnbench.kernels._plan import geometry_of

    x = _small_s_input(shape, layout, dtype, device)
    geom, _ = geometry_of(x)
    assert (geom.flat_rows, geom.align) == (flat_rows, align), geom
    if flat_rows:
        assert (geom.N, geom.S, geom.W, geom.split_s) == (1, shape[0] * shape[2] * shape[3], shape[2] * shape[3], True)
    run_and_check(x, activation="leaky_relu", training=training)
    assert triton_spy, "the Triton launchers did not run"


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("param_dtype", ["fp32", "same"])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_inputs_with_fp32_statistics(dtype, param_dtype, training, triton_spy, path, device):
    # fp32 parameters with low-precision input is what autocast produces; "same" is a model cast with .half()
    pdtype = torch.float32 if param_dtype == "fp32" else dtype
    x = make_input((4, 3, 2, 3), dtype, device, "channels_last")
    run_and_check(x, activation="silu", training=training, param_dtype=pdtype)
    assert triton_spy


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_affine_and_running_stat_switches(affine, track, triton_spy, path, device):
    run_and_check(make_input((4, 3, 3), torch.float32, device), activation="gelu", affine=affine, track=track)
    assert triton_spy


def test_large_mean_small_std_normalises_in_fp32(triton_spy, path, device):
    # |mean| / std = 1e5: a plain sum/sum-of-squares variance would cancel to garbage (or go negative).
    torch.manual_seed(0)
    x = 1000.0 + 0.01 * torch.randn(64, 3, device=device)
    weight, bias, rm, rv = params(3, device)
    ref = reference(x, rm.clone(), rv.clone(), weight, bias, training=True, activation="identity")
    y = bnbench.batch_norm_act(x, rm, rv, weight, bias, training=True, activation="identity", backend="triton")
    # PyTorch's own fp32 batch norm on the same input is the yardstick: an fp32 mean of ~1000 carries an
    # absolute error of ~6e-5 (its ulp), i.e. ~1e-3 relative to std 0.01, for any fp32 implementation.
    torch_fp32 = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True)
    budget = max(2 * rel_err(torch_fp32, ref.y), 1e-3)
    assert rel_err(y, ref.y) < budget, (rel_err(y, ref.y), rel_err(torch_fp32, ref.y))
    assert rel_err(rv, ref.running_var) < 1e-4
    assert triton_spy


def test_gradients_are_bitwise_deterministic(triton_spy, path, device):
    x = make_input((6, 3, 5), torch.float32, device)
    weight, bias, _, _ = params(3, device)
    grad_out = torch.randn_like(x)
    grads = []
    for _ in range(3):
        xg, wg, bg = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
        bnbench.batch_norm_act(xg, None, None, wg, bg, training=True, activation="tanh", backend="triton").backward(
            grad_out
        )
        grads.append((xg.grad, wg.grad, bg.grad))
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            assert torch.equal(a, b)


def test_broadcast_grad_output_with_zero_strides(triton_spy, device):
    # y.sum().backward() hands the backward an expanded tensor of stride 0: read, never copied
    x = make_input((4, 3, 2), torch.float32, device)
    xg = x.detach().requires_grad_(True)
    bnbench.batch_norm_act(xg, None, None, training=True, activation="sigmoid", backend="triton").sum().backward()
    ref = reference(x, None, None, training=True, activation="sigmoid", grad_output=torch.ones_like(x))
    assert rel_err(xg.grad, ref.grad_input) < 1e-5


def test_empty_batch_in_eval_returns_empty(triton_spy, device):
    x = torch.randn(0, 3, 2, 2, device=device)
    _, _, rm, rv = params(3, device)
    y = bnbench.batch_norm_act(x, rm, rv, training=False, backend="triton")
    assert y.shape == x.shape


def test_kernel_config_heuristics_pick_both_paths(monkeypatch):
    from bnbench.kernels import KernelConfig, _plan
    from bnbench.kernels._plan import default_config, geometry_of

    monkeypatch.setattr(_plan, "_sm_count", lambda device: 132)  # plan for an H100/H200
    cpu = torch.device("cpu")

    def plan(t):
        geom, (strides,) = geometry_of(t)
        return geom, strides, default_config(geom, strides, t.element_size(), cpu)

    meta = {"device": "meta"}  # shapes and strides without storage
    geom, _, cfg = plan(torch.empty(256, 1024, **meta))
    # launch-bound (1 MB): one fused launch, register-resident (one tile), 32-byte channel runs to fill the SMs
    assert cfg.num_partials == 1 and cfg.tiles(geom)[0] == 1 and cfg.block_size_c == 8
    _, _, cfg = plan(torch.empty(32768, 1024, **meta))
    assert cfg.num_partials > 1  # 134 MB: the reduction is split across programs
    geom, strides, cfg = plan(torch.empty(2, 3, 28, 28, **meta))
    assert geom.S == 784 and strides.s == 1
    assert cfg.block_size_s > 1 and cfg.block_size_c <= 16  # NCHW: tiles run along the unit-stride S axis
    geom, strides, _ = plan(torch.empty(2, 3, 28, 28, **meta).to(memory_format=torch.channels_last))
    assert (geom.N, geom.S, strides.c) == (2 * 784, 1, 1)  # channels_last: rows merge into one axis
    geom, _, _ = plan(torch.empty(2, 3, 4, 6, **meta)[..., ::2])
    assert not geom.split_s  # stride 2 along W: still one strided S axis
    geom, _, _ = plan(torch.empty(2, 3, 4, 6, **meta)[..., :3])
    assert geom.split_s  # cropped W: H and W of this view cannot merge
    geom, _, cfg = plan(torch.empty(1, 140000, 1024, **meta))  # long S, many channels: small channel blocks
    assert -(-geom.C // cfg.block_size_c) <= 65535  # CUDA's limit on grid axis 1, where channel blocks go
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(3, 2, 1, 1)


@pytest.mark.gpu
@pytest.mark.slow
def test_more_than_2_31_elements_index_correctly():
    # 2**31 + 64k fp16 elements (4.3 GB): offsets past int32 must be computed in int64 (INDEX_64)
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip(f"needs 16 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    C = 64
    N = 2**31 // C + 1024
    x = torch.empty((N, C), device="cuda", dtype=torch.float16)
    for start in range(0, N, 2**24 // C):  # filled in chunks: randn of the whole tensor would need fp32 space
        chunk = x[start : start + 2**24 // C]
        chunk.copy_(torch.randn(chunk.shape, device="cuda") * 2 + 1)
    from bnbench.kernels import plan

    assert plan(x)[0].index_64
    y = bnbench.batch_norm_act(x, None, None, training=True, activation="identity", backend="triton")
    s1 = torch.zeros(C, device="cuda", dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    for start in range(0, N, 2**24 // C):  # float64 statistics, chunk by chunk
        chunk = x[start : start + 2**24 // C].double()
        s1 += chunk.sum(0)
        s2 += (chunk * chunk).sum(0)
    mean = s1 / N
    rstd = (s2 / N - mean * mean + 1e-5).rsqrt()
    for rows in (slice(0, 1024), slice(N - 1024, N)):  # both ends: the tail lies past 2**31 elements
        expected = (x[rows].double() - mean) * rstd
        assert rel_err(y[rows], expected) < tolerance(torch.float16)
