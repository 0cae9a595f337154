"""How accurate memory-saving mode's gradients are: the bound, and the warning where it passes the tolerance.

Memory-saving mode (``memory_saving=True``) stores y in the input's dtype and rebuilds x_hat = (act^-1(y) - b) / w
from it in backward. Storing rounds: fl(z) = z (1 + d) with |d| <= u, the dtype's unit roundoff (2**-11 for
float16, 2**-8 for bfloat16, 2**-24 for float32), and the rebuild adds one fp32 rounding, so

    |x_hat' - x_hat| <= (u + u_fp32) |z| / |w| <= (u + u_fp32) (|x_hat| + |b| / |w|).

In training x_hat has unit mean square per channel, hence ||x_hat' - x_hat|| / ||x_hat|| <= (u + u_fp32)
(1 + |b| / |w|), and the gradients (sums of dz * x_hat, and dx through them) inherit errors of that size: a
channel with w = 0.01, b = 5 (|b|/|w| = 500) gets 0.24 in float16 and 2.0 in bfloat16. Where |w| is below
``MEMORY_SAVING_MIN_ABS_WEIGHT`` it is floored and x_hat is lost.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from bnbench.reference import MEMORY_SAVING_MIN_ABS_WEIGHT
from bnbench.testing import tolerance

__all__ = ["check_memory_saving_precision", "memory_saving_error_bound", "memory_saving_max_ratio"]

#: input dtypes the bound is stated for (the kernels' dtypes; float64 memory saving rebuilds in fp32 anyway)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def memory_saving_error_bound(dtype: torch.dtype, ratio: float) -> float:
    """Bound on the relative error of x_hat rebuilt from a saved output in ``dtype``, in a channel whose
    |bias| / |weight| is ``ratio``: (u + u_fp32) * (1 + ratio)."""
    return (_unit_roundoff(dtype) + _unit_roundoff(torch.float32)) * (1.0 + ratio)


def memory_saving_max_ratio(dtype: torch.dtype) -> float:
    """The largest |bias| / |weight| whose bound stays within the dtype's tolerance (:mod:`bnbench.testing`):
    about 9.2 for float16 (tolerance 5e-3) and 4.1 for bfloat16 (2e-2)."""
    return tolerance(dtype) / memory_saving_error_bound(dtype, 0.0) - 1.0


def check_memory_saving_precision(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    """Warn (UserWarning, naming the channel and the numbers) when the worst channel's bound passes the dtype's
    tolerance, or a channel's |weight| is floored.

    Reads the parameters on the host: one synchronisation per call, in memory-saving mode only. Not done while
    torch.compile traces or a CUDA graph is captured, where the host cannot read them.
    """
    if torch.compiler.is_compiling() or (input.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if input.dtype not in _DTYPES or (weight is None and bias is None) or input.shape[1] == 0:
        return
    abs_w = weight.detach().float().abs() if weight is not None else None
    abs_b = bias.detach().float().abs() if bias is not None else torch.zeros_like(abs_w)
    ratio = abs_b / (abs_w.clamp_min(MEMORY_SAVING_MIN_ABS_WEIGHT) if abs_w is not None else 1.0)
    if abs_w is not None:  # x_hat is lost where |w| is floored, whatever the bias
        ratio = torch.where(abs_w < MEMORY_SAVING_MIN_ABS_WEIGHT, torch.inf, ratio)
    worst = int(ratio.argmax())
    value = float(ratio[worst])
    bound = memory_saving_error_bound(input.dtype, value)
    tol = tolerance(input.dtype)
    if bound <= tol:
        return
    if value == float("inf"):
        what = (
            f"|weight| = {float(abs_w[worst]):.3g} < {MEMORY_SAVING_MIN_ABS_WEIGHT:g} in channel {worst}, where x_hat "
            "cannot be rebuilt from the saved output (|weight| is floored there): that channel's gradients are "
            "approximate"
        )
    else:
        what = (
            f"|bias|/|weight| = {value:.4g} in channel {worst}, so x_hat rebuilt from the saved output carries a "
            f"relative error up to (u + u_fp32) * (1 + |bias|/|weight|) = {bound:.2g}, above the {input.dtype} "
            f"tolerance {tol:g} (|bias|/|weight| <= {memory_saving_max_ratio(input.dtype):.3g} stays within it); "
            "the gradients are off by as much"
        )
    warnings.warn(
        f"memory_saving=True in {input.dtype}: {what}. Use memory_saving=False, or a wider dtype.",
        UserWarning,
        stacklevel=3,
    )
