"""Linear / 1x1 conv + BatchNorm + activation (bnbench.linear_bn) against float64 module chains.

The Triton path runs under the interpreter on CPU (tests/conftest.py), natively on a GPU. The ``spy`` fixture
counts the launches (the matmul kernel itself, and the BatchNorm launchers) and poisons every output the
kernels allocate with NaN, so an element a kernel forgets to write fails the comparison.

Shapes and why: Linear M=37 rows (not a multiple of the 16-row interpreter tile: 3 row tiles, so 3 statistics
partials to merge, the last one ragged), K=20 (two K steps, the second ragged), N=19 (two column tiles, the second
ragged; not a power of two). Conv: batch 2, C_in=20, 5x6 (odd sizes; stride 2 gives 3x3 from a strided view),
C_out=19. A mean offset of 3 on the input makes |mean(Z)| >> std(Z) per column (fp32 only: in fp16/bf16 the
module chain's own rounding of Z is then larger than the tolerance).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnbench
from bnbench.testing import rel_err, tolerance

ACTIVATION_MODULES = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: the GPU when there is one (natively), else the CPU under the Triton interpreter
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _CountingKernel:
    """Stands in for a @triton.jit kernel: counts ``kernel[grid](...)`` launches and forwards them."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.kernel[grid]


@pytest.fixture
def spy(monkeypatch):
    """Launch counts: ``gemm`` (the matmul kernel) and the BatchNorm launchers; every Triton output is poisoned.
    On a GPU the matmul runs with the interpreter's 16x16x16 tiles too, so these shapes still have several
    row tiles (statistics partials) and ragged edges; test_default_tiles_on_gpu covers the launcher's own."""
    from bnbench.kernels import gemm_launchers, launchers

    if DEVICE.type == "cuda":
        small = gemm_launchers.GemmConfig(16, 16, 16, group_size_m=2, num_warps=4, num_stages=2)
        monkeypatch.setattr(gemm_launchers, "default_gemm_config", lambda *args, **kwargs: small)

    counts = dict.fromkeys(("gemm", "gemm_infer", "bn_act_apply", "bn_act_fwd_eval", "bn_act_bwd"), 0)
    for kernel, name in (("_gemm_bn_stats_kernel", "gemm"), ("_gemm_bn_act_eval_kernel", "gemm_infer")):
        monkeypatch.setattr(gemm_launchers, kernel, _CountingKernel(getattr(gemm_launchers, kernel), counts, name))
    for name in ("bn_act_apply", "bn_act_fwd_eval", "bn_act_bwd"):
        original = getattr(launchers, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(launchers, name, counted)
    monkeypatch.setattr(
        gemm_launchers,
        "_alloc_z",
        lambda shape, like: torch.full(shape, float("nan"), dtype=like.dtype, device=like.device),
    )
    monkeypatch.setattr(launchers, "_alloc_like", lambda t: torch.full_like(t, float("nan")))
    return counts


def _float_state(module: nn.Module, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in module.state_dict().items()}


def make_linear(activation="relu", dtype=torch.float32, K=20, N=19, **bn_kwargs):
    """(fused layer on the triton backend, float64 chain with the same state). The Linear weight is in ``dtype``;
    BatchNorm's parameters and statistics stay fp32, as nn.BatchNorm keeps them under autocast."""
    param = 0.1 if activation == "leaky_relu" else None
    fused = bnbench.LinearBatchNormAct(K, N, activation=activation, activation_param=param, backend="triton",
                                       **bn_kwargs)  # fmt: skip
    with torch.no_grad():
        if fused.bn.weight is not None:
            fused.bn.weight.uniform_(0.5, 1.5)
            fused.bn.bias.normal_(0, 0.5)
        if fused.bn.running_mean is not None:
            fused.bn.running_mean.normal_(0, 0.1)
            fused.bn.running_var.uniform_(0.5, 1.5)
    fused.linear.to(dtype)
    chain = nn.Sequential(nn.Linear(K, N, bias=False), nn.BatchNorm1d(N, **bn_kwargs), ACTIVATION_MODULES[activation]())
    chain.load_state_dict(_float_state(fused, torch.float64))
    return fused.to(DEVICE), chain.double().to(DEVICE)


def make_conv(activation="relu", dtype=torch.float32, stride=1, C_in=20, C_out=19, **bn_kwargs):
    param = 0.1 if activation == "leaky_relu" else None
    fused = bnbench.Conv1x1BatchNormAct2d(C_in, C_out, stride, activation=activation, activation_param=param,
                                          backend="triton", **bn_kwargs)  # fmt: skip
    with torch.no_grad():
        fused.bn.weight.uniform_(0.5, 1.5)
        fused.bn.bias.normal_(0, 0.5)
    fused.conv.to(dtype)
    chain = nn.Sequential(
        nn.Conv2d(C_in, C_out, 1, stride=stride, bias=False), nn.BatchNorm2d(C_out, **bn_kwargs),
        ACTIVATION_MODULES[activation](),
    )  # fmt: skip
    chain.load_state_dict(_float_state(fused, torch.float64))
    return fused.to(DEVICE), chain.double().to(DEVICE)


def check_against(fused, chain, x, *, grads=True, what=""):
    """One forward (+ backward) of both; compares outputs, every gradient and the BatchNorm state."""
    tol = tolerance(x.dtype)
    x = x.to(DEVICE)
    xf = x.detach().clone().requires_grad_(grads)
    x64 = x.detach().double().requires_grad_(grads)
    y = fused(xf)
    y64 = chain(x64)
    assert y.dtype == x.dtype and y.shape == y64.shape
    assert rel_err(y, y64) < tol, (what, "y", rel_err(y, y64))
    if grads:
        dy = torch.randn(y64.shape, device=DEVICE).to(x.dtype)
        y.backward(dy)
        y64.backward(dy.double())
        pairs = [("dx", xf.grad, x64.grad), ("dW", fused._modules["0"].weight.grad, chain[0].weight.grad)]
        if fused.bn.weight is not None:
            pairs += [("dgamma", fused.bn.weight.grad, chain[1].weight.grad)]
            pairs += [("dbeta", fused.bn.bias.grad, chain[1].bias.grad)]
        for name, got, want in pairs:
            assert got is not None and got.dtype == (x.dtype if name in ("dx", "dW") else torch.float32), name
            assert rel_err(got, want) < tol, (what, name, rel_err(got, want))
    for name in ("running_mean", "running_var"):
        got, want = getattr(fused.bn, name), getattr(chain[1], name)
        assert (got is None) == (want is None)
        if got is not None:
            assert rel_err(got, want) < tolerance(torch.float32), (what, name, rel_err(got, want))
    if chain[1].num_batches_tracked is None:
        assert fused.bn.num_batches_tracked is None
    else:
        assert torch.equal(fused.bn.num_batches_tracked, chain[1].num_batches_tracked)
    return y


@pytest.mark.parametrize("activation", list(ACTIVATION_MODULES))
def test_linear_every_activation_train_fp32_with_a_large_mean(activation, spy):
    fused, chain = make_linear(activation)
    x = torch.randn(37, 20) + 3.0
    check_against(fused, chain, x, what=activation)
    assert spy == {"gemm": 1, "gemm_infer": 0, "bn_act_apply": 1, "bn_act_fwd_eval": 0, "bn_act_bwd": 1}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_linear_dtypes_train_and_eval(dtype, training, spy):
    fused, chain = make_linear("gelu", dtype)
    fused.train(training)
    chain.train(training)
    x = (torch.randn(37, 20) + 0.5).to(dtype)
    check_against(fused, chain, x, what=(dtype, training))
    assert spy["gemm"] == 1 and spy["bn_act_bwd"] == 1
    assert (spy["bn_act_apply"], spy["bn_act_fwd_eval"]) == ((1, 0) if training else (0, 1))


def test_linear_momentum_none_counts_batches_over_several_steps(spy):
    fused, chain = make_linear("relu", momentum=None)
    for step in range(3):
        check_against(fused, chain, torch.randn(37, 20) * (step + 1), grads=False, what=step)
    assert int(fused.bn.num_batches_tracked) == 3


@pytest.mark.parametrize("bn_kwargs", [dict(affine=False), dict(track_running_stats=False)], ids=str)
def test_linear_affine_off_and_untracked_statistics(bn_kwargs, spy):
    fused, chain = make_linear("silu", **bn_kwargs)
    check_against(fused, chain, torch.randn(37, 20))
    fused.eval()
    chain.eval()
    check_against(fused, chain, torch.randn(37, 20), what="eval")  # untracked: batch statistics in eval too


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_conv1x1_channels_last_train_every_dtype_and_stride(dtype, stride, spy):
    # silu, not relu: relu's gradient jumps at 0, and where bf16's rounding of Z decides the side of an element
    # the float64 gradient differs by a whole dy (eager bf16 shows the same 5% error in dx on this input)
    fused, chain = make_conv("silu", dtype, stride)
    x = (torch.randn(2, 20, 5, 6) + 0.5).to(dtype).to(memory_format=torch.channels_last)
    y = check_against(fused, chain, x, what=(dtype, stride))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert spy["gemm"] == 1 and spy["bn_act_apply"] == 1 and spy["bn_act_bwd"] == 1


@pytest.mark.parametrize("stride", [1, 2])
def test_conv1x1_nchw_input_is_read_through_its_strides_and_eval(stride, spy):
    fused, chain = make_conv("leaky_relu", torch.float32, stride)
    x = torch.randn(2, 20, 5, 6)
    check_against(fused, chain, x, what="train")
    fused.eval()
    chain.eval()
    check_against(fused, chain, x, what="eval")
    assert spy["bn_act_fwd_eval"] == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["leaky_relu", "gelu_tanh"])
def test_inference_runs_batchnorm_in_the_matmul_epilogue(dtype, activation, spy):
    """Eval with no gradient wanted: one launch per layer, Z never written; Linear and a strided conv."""
    layers = [make_linear(activation, dtype), make_conv(activation, dtype, 2)]
    inputs = [torch.randn(37, 20) + 0.5, (torch.randn(2, 20, 5, 6) + 0.5).to(memory_format=torch.channels_last)]
    for (fused, chain), x in zip(layers, inputs, strict=True):
        fused.eval()
        chain.eval()
        with torch.no_grad():
            y = fused(x.to(dtype).to(DEVICE))
            y64 = chain(x.to(dtype).to(DEVICE).double())
        assert y.dtype == dtype and rel_err(y, y64) < tolerance(dtype), (type(fused).__name__, rel_err(y, y64))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert spy == {"gemm": 0, "gemm_infer": 2, "bn_act_apply": 0, "bn_act_fwd_eval": 0, "bn_act_bwd": 0}


def test_autocast_casts_the_matmul_operands_as_it_does_for_nn_linear(spy):
    fused, _ = make_linear("relu")
    reference = copy.deepcopy(fused)
    reference.backend = "torch"
    x = (torch.randn(37, 20, device=DEVICE) + 0.5).requires_grad_(True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = fused(x)
        y_ref = reference(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and rel_err(y, y_ref.float()) < tolerance(torch.bfloat16)
    y.float().sum().backward()
    assert fused.linear.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert spy["gemm"] == 1


def test_bitwise_deterministic_reruns(spy):
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        fused, _ = make_linear("tanh", torch.bfloat16)
        x = (torch.randn(37, 20, device=DEVICE) + 0.5).to(torch.bfloat16).requires_grad_(True)
        y = fused(x)
        y.backward(torch.ones_like(y))
        results.append([y, x.grad, fused.linear.weight.grad, fused.bn.weight.grad, fused.bn.bias.grad,
                        fused.bn.running_mean, fused.bn.running_var])  # fmt: skip
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("max_partials", [512, 2, 1])
def test_forward_statistics_come_from_the_matmul_partials(max_partials, spy, monkeypatch):
    """The merge kernel combines the gemm's per-row-tile partials: the batch mean and variance are right to fp32
    for a split into 3 ragged row tiles (the running statistics at momentum 1 are the batch ones), in one launch
    (one group of 3), or two when the partials pass MAX_PARTIALS (of 2: groups of 2 and 1, then those two; of 1:
    one group of 3 at once)."""
    from bnbench.kernels import gemm_launchers
    from bnbench.kernels.gemm_launchers import linear_bn_act_fwd_train

    monkeypatch.setattr(gemm_launchers, "MAX_PARTIALS", max_partials)
    merges = {"merge": 0}
    kernel = gemm_launchers._gemm_partials_merge_kernel
    monkeypatch.setattr(gemm_launchers, "_gemm_partials_merge_kernel", _CountingKernel(kernel, merges, "merge"))

    x, w = torch.randn(37, 20, device=DEVICE) + 3.0, torch.randn(19, 20, device=DEVICE)
    rm, rv = torch.zeros(19, device=DEVICE), torch.zeros(19, device=DEVICE)
    _, z, mean, rstd = linear_bn_act_fwd_train(x, w, None, None, rm, rv, momentum=1.0, eps=1e-5, activation="relu")
    z64 = x.double() @ w.double().t()
    assert rel_err(z, z64) < 1e-6
    assert rel_err(mean, z64.mean(0)) < 1e-6
    assert rel_err(rv, z64.var(0, unbiased=True)) < 1e-5
    assert rel_err(rstd, (z64.var(0, unbiased=False) + 1e-5).rsqrt()) < 1e-5
    assert spy["gemm"] == 1 and merges["merge"] == {512: 1, 2: 2, 1: 1}[max_partials]


def test_torch_backend_is_the_module_chain_bitwise():
    fused, _ = make_linear("gelu")
    fused.backend = "torch"
    chain = nn.Sequential(nn.Linear(20, 19, bias=False), nn.BatchNorm1d(19), nn.GELU()).to(DEVICE)
    chain.load_state_dict(fused.state_dict())
    x = torch.randn(37, 20, device=DEVICE)
    assert torch.equal(fused(x), chain(x))
    assert torch.equal(fused.bn.running_var, chain[1].running_var)


def test_bad_inputs_raise_before_any_kernel_runs(spy):
    fused, _ = make_linear("relu")
    with pytest.raises(ValueError, match="2-D input"):
        fused(torch.randn(4, 3, 20, device=DEVICE))
    with pytest.raises(ValueError, match="20 input features"):
        fused(torch.randn(8, 21, device=DEVICE))
    with pytest.raises(TypeError, match=r"weight has dtype torch\.float32 but input has torch\.float16"):
        fused(torch.randn(8, 20, device=DEVICE).half())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 20, device=DEVICE))
    with pytest.raises(ValueError, match="input_precision"):
        bnbench.linear_batch_norm_act(torch.randn(4, 20), torch.randn(19, 20), training=True, input_precision="fp16")
    conv = bnbench.Conv1x1BatchNormAct2d(20, 19, backend="triton", device=DEVICE)
    with pytest.raises(ValueError, match="4-D input"):
        conv(torch.randn(2, 20, 5, device=DEVICE))
    assert spy["gemm"] == 0


def test_triton_backend_on_cpu_without_the_interpreter_is_an_error(run_python):
    code = (
        "import torch, bnbench\n"
        "m = bnbench.LinearBatchNormAct(4, 3, backend='triton')\n"
        "try:\n    m(torch.randn(5, 4))\nexcept ValueError as e:\n    print('ValueError', e)\n"
    )
    result = run_python("-c", code, drop=("TRITON_INTERPRET",))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ValueError" in result.stdout and "TRITON_INTERPRET" in result.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_tiles_on_gpu(dtype):
    """The launcher's own tiles (128-row tensor-core tiles, 64x64 exact fp32) on a ResNet-like 1x1 conv: 1000
    rows (ragged against 128 and 64), K=64, N=256, stride 2 from a channels_last input."""
    fused, chain = make_conv("silu", dtype, 2, C_in=64, C_out=256)
    x = (torch.randn(10, 64, 20, 20) + 0.5).to(dtype).to(memory_format=torch.channels_last)
    check_against(fused, chain, x, what=dtype)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_torch_compile_fullgraph_traces_the_custom_ops(kind, spy):
    """Train step (forward, backward, running statistics) and inference through torch.compile(fullgraph=True):
    the Triton path is torch.library ops, so there is no graph break. aot_eager (AOTAutograd without Inductor's
    code generation) keeps it quick on CPU; the ops run the same kernels under any backend."""
    import torch._dynamo

    torch._dynamo.reset()
    if kind == "linear":
        (fused, chain), x = make_linear("silu"), torch.randn(37, 20, device=DEVICE)
    else:
        (fused, chain), x = make_conv("relu", stride=2), torch.randn(2, 20, 5, 6, device=DEVICE)
        x = x.to(memory_format=torch.channels_last)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    xf, x64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    y, y64 = compiled(xf), chain(x64)
    dy = torch.randn(y64.shape, device=DEVICE)
    y.backward(dy)
    y64.backward(dy.double())
    assert rel_err(y, y64) < tolerance(torch.float32) and rel_err(xf.grad, x64.grad) < tolerance(torch.float32)
    assert rel_err(fused.bn.running_var, chain[1].running_var) < tolerance(torch.float32)
    assert spy["gemm"] == 1 and spy["bn_act_bwd"] == 1
    fused.eval()
    chain.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), chain(x.double())) < tolerance(torch.float32)
    assert spy["gemm_infer"] == 1


def test_tf32_input_precision_runs_the_triton_matmul(spy):
    """input_precision="tf32" reaches the kernel (under the interpreter the products stay exact). Tolerance:
    tf32 products carry fp16's 10-bit mantissa with fp32 accumulation, so fp16's row of the table applies."""
    fused, chain = make_linear("gelu")
    fused.input_precision = "tf32"
    x = torch.randn(37, 20, device=DEVICE) + 0.5
    y = fused(x)
    assert rel_err(y, chain(x.double())) < tolerance(torch.float16)
    assert spy["gemm"] == 1
    with pytest.raises(ValueError, match="torch backend follows"):
        bnbench.linear_batch_norm_act(x, fused.linear.weight, training=True, input_precision="tf32", backend="torch")
