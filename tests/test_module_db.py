"""PyTorch's own BatchNorm1d/2d module samples, driven against BatchNormAct1d/2d with the identity activation.

torch's wheel ships the ModuleInfo entries for nn.BatchNorm1d/2d (``torch.testing._internal.common_modules.module_db``:
sample inputs for every constructor and call variant, and error inputs with the exception PyTorch raises); the
generic tests that drive them live in PyTorch's source tree, not in the wheel. This is the project's own driver
over those samples, used at run time (nothing is copied): for every sample, both modes and both paths, the fused
layer must behave as nn.BatchNorm does: forward, input and parameter gradients, second derivatives, forward-mode
AD, running statistics and num_batches_tracked, output strides for non-contiguous and channels_last inputs,
state_dict both ways, pickling, repr, factory kwargs, and every error input (same type, same message).

Paths: ``triton`` (the Triton kernels: the interpreter on CPU, natively on a GPU; the ``launches`` fixture proves
they ran) in float32, the kernels' widest dtype; ``torch`` (the PyTorch path) in float32 and float64 (the
ModuleInfo dtypes). The reference is nn.BatchNorm in float64 on upcast copies, with the same state; parameters and
running statistics are randomised (one channel with a small running variance, so an eps applied twice shows).
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import re

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad as fwAD

import bnbench
from bnbench.testing import rel_err, tolerance

try:
    _frozen = torch.backends.flags_frozen()
    from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
except ImportError as error:  # torch's test helpers need expecttest (in the project's test extra)
    if os.environ.get("CI"):
        raise
    pytest.skip(
        f"torch.testing._internal.common_modules does not import here ({error}); pip install expecttest",
        allow_module_level=True,
    )
else:
    # importing torch's test utilities freezes torch.backends' global flags for the rest of the process
    if not _frozen and torch.backends.flags_frozen():
        vars(torch.backends)["__allow_nonbracketed_mutation_flag"] = True

FUSED = {nn.BatchNorm1d: bnbench.BatchNormAct1d, nn.BatchNorm2d: bnbench.BatchNormAct2d}
INFOS = {info.module_cls: info for info in module_db if info.module_cls in FUSED}
assert set(INFOS) == set(FUSED), f"module_db lacks an entry for {set(FUSED) - set(INFOS)}"

#: (backend, dtype) pairs: the Triton kernels in float32; the PyTorch path in both ModuleInfo dtypes
PATHS = [
    pytest.param("triton", torch.float32, id="triton-float32"),
    pytest.param("torch", torch.float32, id="torch-float32"),
    pytest.param("torch", torch.float64, id="torch-float64"),
]


def _samples(cls, device, dtype, *, requires_grad=False, training=True):
    info = INFOS[cls]
    return info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=requires_grad, training=training)


def _sample_params(with_layouts: bool = False):
    """One pytest.param per (module class, sample) [and input layout]: ids are PyTorch's sample descriptions."""
    params = []
    for cls in FUSED:
        for index, sample in enumerate(_samples(cls, "cpu", torch.float32)):
            name = f"{cls.__name__}-{sample.desc or 'default'}"
            if not with_layouts:
                params.append(pytest.param(cls, index, id=name))
                continue
            (x,) = sample.forward_input.args
            layouts = ["contiguous", "noncontiguous"] + (["channels_last"] if x.dim() == 4 else [])
            params += [pytest.param(cls, index, layout, id=f"{name}-{layout}") for layout in layouts]
    return params


def _sample(cls, index, device, dtype, training=True):
    samples = _samples(cls, device, dtype, requires_grad=True, training=training)
    return samples[index]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (a leaf that requires grad)."""
    x = x.detach()
    if layout == "noncontiguous":  # every other element of a twice-as-wide last axis
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        x = wide[..., ::2]
        assert x.numel() == 0 or not x.is_contiguous()
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _build(cls, sample, backend, dtype, device):
    """(fused layer, float64 nn.BatchNorm twin) from one sample's constructor input, with randomised state."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    fused = FUSED[cls](*args, **kwargs, activation="identity", backend=backend, device=device, dtype=dtype)
    ref = cls(*args, **kwargs, device=device, dtype=torch.float64)
    with torch.no_grad():
        if fused.weight is not None:
            fused.weight.uniform_(0.5, 1.5)
        if fused.bias is not None:
            fused.bias.normal_(0.0, 0.5)
        if fused.running_mean is not None:
            fused.running_mean.normal_(0.0, 0.5)
            fused.running_var.uniform_(0.5, 2.0)
            fused.running_var[0] = 1e-3  # as small as the samples' eps: eps must be added exactly once
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in fused.state_dict().items()})
    return fused, ref


def _params(module):
    return [p for p in (module.weight, module.bias) if p is not None]


def _launched(launches) -> int:
    return sum(launches.values())


def _check_path(backend, launches, expected_any: bool = True):
    """The Triton path ran the kernels (and the PyTorch path did not)."""
    if backend == "triton":
        assert _launched(launches) > 0 or not expected_any, "the Triton path ran no Triton launcher"
    else:
        assert _launched(launches) == 0, f"the PyTorch path ran Triton launchers: {launches}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("backend", "dtype"), PATHS)
@pytest.mark.parametrize(("cls", "index", "layout"), _sample_params(with_layouts=True))
def test_forward_and_gradients_match_nn(cls, index, layout, backend, dtype, training, launches, device):
    """y, its strides, dx, dweight, dbias, running_mean, running_var and num_batches_tracked against nn.BatchNorm
    in float64; two steps for contiguous input (the running statistics' sequence, momentum=None's cumulative
    factor), one for the other layouts (the interpreter is slow on them, and the statistics do not depend on it)."""
    tol = tolerance(dtype)
    fused, ref = _build(cls, _sample(cls, index, device, dtype), backend, dtype, device)
    fused.train(training)
    ref.train(training)
    for _ in range(2 if layout == "contiguous" else 1):
        (x,) = _sample(cls, index, device, dtype, training).forward_input.args
        x = _layout(x, layout)
        x64 = x.detach().double().requires_grad_()
        y, y_ref = fused(x), ref(x64)
        assert y.dtype == dtype and y.shape == y_ref.shape
        assert y.stride() == y_ref.stride(), "output layout differs from nn.BatchNorm's"
        assert rel_err(y, y_ref) < tol
        grad = torch.randn_like(y_ref)
        y.backward(grad.to(dtype))
        y_ref.backward(grad)
        assert rel_err(x.grad, x64.grad) < tol
        for p, p_ref in zip(_params(fused), _params(ref), strict=True):
            assert rel_err(p.grad, p_ref.grad) < tol
        for name in ("running_mean", "running_var"):
            if getattr(ref, name) is not None:
                assert rel_err(getattr(fused, name), getattr(ref, name)) < tol, name
        if ref.num_batches_tracked is not None:
            assert int(fused.num_batches_tracked) == int(ref.num_batches_tracked)
    _check_path(backend, launches)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("backend", "dtype"), PATHS)
@pytest.mark.parametrize(("cls", "index"), _sample_params())
def test_state_dict_pickling_and_repr(cls, index, backend, dtype, training, launches, device):
    """state_dict keys, values and version both ways with nn.BatchNorm; torch.save and pickle round trips that
    keep the class, the fused layer's settings and the outputs; repr is nn.BatchNorm's plus the activation."""
    sample = _sample(cls, index, device, dtype)
    fused, ref = _build(cls, sample, backend, dtype, device)
    fused.train(training)
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert fused.state_dict()._metadata[""]["version"] == ref.state_dict()._metadata[""]["version"]
    plain = type(ref)(*sample.constructor_input.args, **sample.constructor_input.kwargs, device=device, dtype=dtype)
    plain.load_state_dict(fused.state_dict())  # strict both ways
    fused.load_state_dict(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value), key

    backend_repr = "" if backend == "auto" else f", backend={backend!r}"
    assert repr(fused) == f"{type(fused).__name__}({ref.extra_repr()}, activation=identity{backend_repr})"

    (x,) = sample.forward_input.args
    x = x.detach()
    expected = copy.deepcopy(fused)(x)  # a copy: training mode updates the statistics
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(fused))):
        assert type(clone) is type(fused) and repr(clone) == repr(fused)
        assert (clone.activation, clone.backend, clone.memory_saving) == (fused.activation, backend, False)
        assert clone.training == training
        assert torch.equal(clone(x), expected)
    _check_path(backend, launches, expected_any=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("cls", "index"), _sample_params())
def test_factory_kwargs(cls, index, dtype, device):
    """device= and dtype= place every parameter and buffer as nn.BatchNorm does (num_batches_tracked stays
    int64); the meta device allocates nothing."""
    sample = _sample(cls, index, device, torch.float32)
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    for where in (device, torch.device("meta")):
        fused = FUSED[cls](*args, **kwargs, activation="identity", device=where, dtype=dtype)
        ref = cls(*args, **kwargs, device=where, dtype=dtype)
        described = {n: (t.shape, t.dtype, t.device, type(t)) for n, t in ref.state_dict(keep_vars=True).items()}
        assert {n: (t.shape, t.dtype, t.device, type(t)) for n, t in fused.state_dict(keep_vars=True).items()} == (
            described
        )
        assert [n for n, _ in fused.named_parameters()] == [n for n, _ in ref.named_parameters()]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("backend", "dtype"), PATHS)
@pytest.mark.parametrize("cls", FUSED)
def test_errors_like_nn(cls, backend, dtype, training, launches, device):
    """Every error input of the ModuleInfo entry, as PyTorch's generic test runs it (a module in training mode):
    the same exception type and message, before any kernel; then the same construction in the mode under test
    behaves as nn.BatchNorm does there (the same error, word for word, or the same output)."""
    info = INFOS[cls]
    error_inputs = info.module_error_inputs_func(info, device=device, dtype=dtype, requires_grad=False, training=True)
    assert error_inputs, "the ModuleInfo entry has no error inputs"
    for error_input in error_inputs:
        sample = error_input.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        fw_args, fw_kwargs = sample.forward_input.args, sample.forward_input.kwargs
        # placed with the input (factory kwargs): PyTorch's generic test builds on the default device and dtype
        factory = {"device": device, "dtype": dtype}
        fused_kwargs = {**kwargs, **factory, "activation": "identity", "backend": backend}
        if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                FUSED[cls](*args, **fused_kwargs)
            continue
        module, before = FUSED[cls](*args, **fused_kwargs), _launched(launches)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            module(*fw_args, **fw_kwargs)
        assert _launched(launches) == before, "a kernel ran before the error"
        module.train(training)
        plain = cls(*args, **kwargs, **factory).train(training)
        try:
            expected = plain(*fw_args, **fw_kwargs)
        except Exception as nn_error:
            with pytest.raises(type(nn_error), match=f"^{re.escape(str(nn_error))}$"):
                module(*fw_args, **fw_kwargs)
        else:
            assert rel_err(module(*fw_args, **fw_kwargs), expected) < tolerance(dtype)


def _differentiate_twice(module, x, grad, weights):
    """First derivatives of y = module(x) for ``grad`` with create_graph=True, then the gradient of
    sum(first * weights) w.r.t. x and the parameters (zeros where independent)."""
    inputs = [x, *_params(module)]
    first = torch.autograd.grad(module(x), inputs, grad, create_graph=True, materialize_grads=True)
    total = sum((g * w).sum() for g, w in zip(first, weights, strict=True))
    return first, torch.autograd.grad(total, inputs, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("backend", "dtype"), PATHS)
@pytest.mark.parametrize(("cls", "index"), _sample_params())
def test_second_derivatives_match_nn(cls, index, backend, dtype, training, launches, device):
    """create_graph=True then a second backward, against nn.BatchNorm's own double backward in float64."""
    fused, ref = _build(cls, _sample(cls, index, device, dtype), backend, dtype, device)
    fused.train(training)
    ref.train(training)
    (x,) = _sample(cls, index, device, dtype, training).forward_input.args
    if x.numel() == 0:
        pytest.skip(
            "empty batch: nn.BatchNorm's own first derivatives of an empty batch are constants (no graph), so there "
            "is no second derivative to compare (test_forward_and_gradients_match_nn compares the first)"
        )
    x64 = x.detach().double().requires_grad_()
    grad = torch.randn_like(x64)
    weights = [torch.randn_like(t) for t in (x64, *_params(ref))]
    first, second = _differentiate_twice(fused, x, grad.to(dtype), [w.to(dtype) for w in weights])
    first_ref, second_ref = _differentiate_twice(ref, x64, grad, weights)
    names = ["x", *(n for n, _ in ref.named_parameters())]
    for order, got, expected in (("first", first, first_ref), ("second", second, second_ref)):
        for name, g, e in zip(names, got, expected, strict=True):
            assert g is not None and rel_err(g, e) < tolerance(dtype), f"{order} derivative, {name}"
    _check_path(backend, launches)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("backend", "dtype"), PATHS)
@pytest.mark.parametrize(("cls", "index"), _sample_params())
def test_forward_mode_ad_matches_nn(cls, index, backend, dtype, training, launches, device):
    """Dual input and parameters (forward-mode AD): the output tangent, and the running statistics, as nn's."""
    fused, ref = _build(cls, _sample(cls, index, device, dtype), backend, dtype, device)
    fused.train(training)
    ref.train(training)
    (x,) = _sample(cls, index, device, dtype, training).forward_input.args
    x = x.detach()
    tangents = {"x": torch.randn_like(x, dtype=torch.float64)}
    tangents |= {n: torch.randn_like(p, dtype=torch.float64) for n, p in ref.named_parameters()}
    results = []
    with fwAD.dual_level():
        for module, inp, as_dtype in ((fused, x, dtype), (ref, x.double(), torch.float64)):
            params = {n: fwAD.make_dual(p.detach(), tangents[n].to(as_dtype)) for n, p in module.named_parameters()}
            dual = fwAD.make_dual(inp, tangents["x"].to(as_dtype))
            results.append(fwAD.unpack_dual(torch.func.functional_call(module, params, (dual,))))
    (y, tangent), (y_ref, tangent_ref) = results
    assert rel_err(y, y_ref) < tolerance(dtype)
    assert tangent is not None and rel_err(tangent, tangent_ref) < tolerance(dtype)
    for name in ("running_mean", "running_var"):
        if getattr(ref, name) is not None:
            assert rel_err(getattr(fused, name), getattr(ref, name)) < tolerance(dtype), name
    _check_path(backend, launches)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("cls", "index"), _sample_params())
def test_float64_samples(cls, index, training, launches, device):
    """The ModuleInfo dtype the kernels lack: backend="auto" runs it through PyTorch (same values as nn), and
    backend="triton" refuses it with an error naming the dtype, before any kernel."""
    sample = _sample(cls, index, device, torch.float64)
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    (x,) = sample.forward_input.args
    auto = FUSED[cls](*args, **kwargs, activation="identity", device=device, dtype=torch.float64).train(training)
    plain = cls(*args, **kwargs, device=device, dtype=torch.float64).train(training)
    assert rel_err(auto(x), plain(x)) < tolerance(torch.float64)
    triton = FUSED[cls](*args, **kwargs, activation="identity", backend="triton", device=device,
                        dtype=torch.float64).train(training)  # fmt: skip
    with pytest.raises(TypeError, match=r"torch\.float64"):
        triton(x)
    assert _launched(launches) == 0
