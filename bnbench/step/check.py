"""The correctness check of a training step: a provider's loss and gradients after one step against those of the
same network in float64, within a bound tied to the precision the step computes in.

The bound is :func:`bnbench.testing.tolerance` of that precision (bf16 under autocast; fp32, or TF32's fp16-sized
mantissa when CUDA convolutions may use TF32) or ``ERROR_MULTIPLE`` times the eager network's own error against
float64, whichever is larger: a deep network with small per-channel batches amplifies rounding by orders of
magnitude, and a fixed per-operation tolerance would fail torch.compile itself.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from bnbench.step.training import DTYPES, Batch, StepCase, StepSettings, Trainer, build

__all__ = ["Reference", "compute_precision", "error_bound", "errors", "reference_step"]


@dataclasses.dataclass(frozen=True)
class Reference:
    """The float64 network's loss and gradients after one step, the eager network's errors against them (the
    rounding error of the run's precision, amplified by the network) and the bounds every provider must meet."""

    f64: dict
    eager_loss_err: float
    eager_grad_err: float
    loss_bound: float
    grad_bound: float
    tied_to: str


def compute_precision(case: StepCase, device: torch.device) -> tuple[torch.dtype, str]:
    """The lowest precision the step computes in, and how it is described: bf16 under autocast; fp32, or TF32
    (fp16's 10-bit mantissa) when CUDA convolutions and matmuls may use TF32."""
    if DTYPES[case.dtype] is not None:
        return DTYPES[case.dtype], f"{case.dtype} autocast"
    if device.type == "cuda" and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return torch.float16, "fp32 with TF32 convolutions/matmuls (fp16's mantissa)"
    return torch.float32, "fp32"


#: how much less accurate than eager (against float64) a provider's loss and gradients may be: fused and compiled
#: networks sum in other orders, so they sit within a small multiple of eager's own error; a real defect (a 1% error
#: in one BatchNorm's scale of the MLP) is about 400x eager's error there, so 100x separates the two
ERROR_MULTIPLE = 100.0


def error_bound(tol: float, eager_err: float) -> float:
    """The largest accepted error of a provider: ``ERROR_MULTIPLE`` times the eager network's own error against
    float64 (how much this network amplifies rounding), but never below ``tol``, the dtype's entry of
    bnbench.testing.TOLERANCE for one operation."""
    return max(tol, ERROR_MULTIPLE * eager_err)


def reference_step(case: StepCase, device: torch.device, settings: StepSettings, batch: Batch) -> Reference:
    from bnbench.testing import tolerance

    model, _ = build(case, device, settings)
    # float64 in NCHW whatever the run's layout (the same math; cuDNN's float64 kernels are NCHW ones)
    f64 = copy.deepcopy(model).double().to(memory_format=torch.contiguous_format)
    f64_batch = Batch(batch.x.double().contiguous(), batch.target)
    exact: dict = {}
    Trainer(f64, dataclasses.replace(case, dtype="fp32"), device, f64_batch, settings.lr).step(exact)
    del f64
    eager: dict = {}
    Trainer(model, case, device, batch, settings.lr).step(eager)
    loss_err, grad_err, _ = errors(eager, exact)
    dtype, tied_to = compute_precision(case, device)
    tol = tolerance(dtype)
    return Reference(exact, loss_err, grad_err, error_bound(tol, loss_err), error_bound(tol, grad_err),
                     f"{tied_to}: the larger of tolerance {tol:g} and {ERROR_MULTIPLE:g}x the eager network's error")  # fmt: skip


def errors(got: dict, ref: dict) -> tuple[float, float, str]:
    """(loss relative error, gradients' relative norm error over all parameters, the worst parameter)."""
    loss_err = abs(got["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
    if set(got["grads"]) != set(ref["grads"]):
        missing = sorted(set(ref["grads"]) ^ set(got["grads"]))[:5]
        return loss_err, math.inf, f"parameters differ from the original network's: {missing}"
    diff2 = norm2 = 0.0
    worst, worst_name = -1.0, ""
    for name, r in ref["grads"].items():
        g = got["grads"][name]
        if (g is None) != (r is None):
            return loss_err, math.inf, f"{name} has a gradient in one network only"
        if r is None:
            continue
        d = (g.double() - r.double()).norm().item() ** 2
        n = r.double().norm().item() ** 2
        diff2, norm2 = diff2 + d, norm2 + n
        rel = math.sqrt(d / n) if n > 0 else (0.0 if d == 0 else math.inf)
        if rel > worst:
            worst, worst_name = rel, name
    grad_err = math.sqrt(diff2 / norm2) if norm2 > 0 else (0.0 if diff2 == 0 else math.inf)
    return loss_err, grad_err, f"{worst_name} ({worst:.3g})"
