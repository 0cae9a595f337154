"""Correctness helpers shared by the tests and the benchmark: the float64 reference and dtype tolerances.

The reference is ``nn.BatchNorm``'s functional form plus the activation (``bnbench.reference``) run in float64 on
upcast copies of the inputs; errors are relative norms ``||out - ref|| / ||ref||``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch

from bnbench.activations import Activation, parse_activation
from bnbench.reference import batch_norm_act_reference

__all__ = ["TOLERANCE", "Reference", "call_in_file", "reference", "rel_err", "tolerance"]

#: The one table of largest accepted ``||out - ref|| / ||ref||`` against the float64 reference, per input dtype
#: (fp32 statistics and accumulation in every case). The tests check tiny tensors and the benchmark checks every
#: point it times, up to GPU-sized ones, with the same numbers. fp16/bf16: a few units of their rounding (2**-11,
#: 2**-8) on y and on gradients computed from rounded inputs. fp32: 1e-4, about 2**10 units of fp32 rounding
#: (2**-24): the per-channel sums behind the statistics and dweight/dbias add N*S terms (millions on a GPU-sized
#: case, e.g. 256x112x112 = 3.2M in ResNet-50's first BatchNorm), whose rounding error grows with the number of
#: terms and the summation order, so a bound that holds for a tiny test tensor (1e-5) is not one the same kernels
#: can promise on the benchmark's tensors. Real bugs sit far above it: a biased instead of unbiased variance
#: (1/(N*S - 1) relative on the running variance, checked as a batch statistic), a missed element, a wrong
#: activation slope or an fp16 accumulation all give errors of 1e-3 or more on the tests' shapes.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def tolerance(dtype: torch.dtype | str) -> float:
    """The tolerance of a torch dtype, or of a results dtype name ("fp32", "fp16", "bf16")."""
    if isinstance(dtype, str):
        from bnbench.schema import torch_dtype

        dtype = torch_dtype(dtype)
    try:
        return TOLERANCE[dtype]
    except KeyError:
        raise TypeError(f"no tolerance defined for dtype {dtype}") from None


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (0 when both are zero; inf if shapes differ)."""
    if actual.shape != expected.shape:
        return float("inf")
    expected = expected.detach().double()
    diff = (actual.detach().double() - expected).norm().item()
    scale = expected.norm().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


@dataclasses.dataclass
class Reference:
    """Float64 outputs of BN (+ residual) + activation: y, the running statistics after the call, and gradients."""

    y: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    grad_input: torch.Tensor | None = None
    grad_weight: torch.Tensor | None = None
    grad_bias: torch.Tensor | None = None
    grad_residual: torch.Tensor | None = None


def _f64(t: torch.Tensor | None, requires_grad: bool = False) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().double().clone().requires_grad_(requires_grad)


def reference(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | Activation = "relu",
    activation_param: float | None = None,
    grad_output: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> Reference:
    """Run the float64 reference on copies (the inputs are not modified); gradients when grad_output is given.
    With ``residual``: y = act(BN(x) + residual), and ``grad_residual`` its gradient."""
    act, param = parse_activation(activation, activation_param)
    want_grad = grad_output is not None
    x64, w64, b64 = _f64(x, want_grad), _f64(weight, want_grad), _f64(bias, want_grad)
    r64 = _f64(residual, want_grad)
    rm64, rv64 = _f64(running_mean), _f64(running_var)
    y = batch_norm_act_reference(x64, rm64, rv64, w64, b64, training, momentum, eps, act, param, r64)
    ref = Reference(y.detach(), rm64, rv64)
    if want_grad:
        y.backward(grad_output.detach().double())
        ref.grad_input = x64.grad
        ref.grad_weight = None if w64 is None else w64.grad
        ref.grad_bias = None if b64 is None else b64.grad
        ref.grad_residual = None if r64 is None else r64.grad
    return ref


def call_in_file(path: str, function: str, *args):
    """Import the Python file ``path`` as a module and call ``function(*args)`` in it.

    A picklable target for ``multiprocessing`` spawn: a spawned child imports its target by module name, and a
    test module (under pytest's importlib mode) has no importable name, while this function does.
    """
    name = f"_bnbench_spawned_{Path(path).stem}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return getattr(module, function)(*args)
