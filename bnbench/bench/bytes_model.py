"""The minimal-bytes model (docs/measuring.md): how many bytes a pass must move at the least, and effective bandwidth.

T is one full read or write of the activation tensor (numel * element size). A pass that kept everything on chip
would move: training forward 2T (read x, write y), backward 3T (read x and dy, write dx), forward+backward 5T,
eval forward 2T. Effective bandwidth = minimal bytes / time, so a kernel that moves more than the minimum shows
up as a lower fraction of the copy bandwidth; a fraction over 1 means cache effects (flag it, do not celebrate).
"""

from __future__ import annotations

import math

from bnbench.schema import ELEMENT_SIZE

__all__ = ["ELEMENT_SIZE", "MIN_TENSOR_PASSES", "bytes_min", "frac_of_copy", "gbps"]

#: minimal full-tensor passes (reads + writes) per pass kind
MIN_TENSOR_PASSES = {"fwd": 2, "bwd": 3, "fwd_bwd": 5, "eval": 2}


def bytes_min(pass_: str, numel: int, dtype: str) -> int:
    """Minimal bytes moved by ``pass_`` over a tensor of ``numel`` elements of ``dtype`` (per-channel vectors
    are ignored: they are C elements against N*C*S)."""
    if pass_ not in MIN_TENSOR_PASSES:
        raise ValueError(f"unknown pass {pass_!r}; valid passes are: {', '.join(MIN_TENSOR_PASSES)}")
    if dtype not in ELEMENT_SIZE:
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes are: {', '.join(ELEMENT_SIZE)}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return MIN_TENSOR_PASSES[pass_] * numel * ELEMENT_SIZE[dtype]


def gbps(nbytes: float, ms: float) -> float:
    """Effective bandwidth in GB/s (1e9 bytes per second) of ``nbytes`` moved in ``ms`` milliseconds; NaN
    when the time is missing or not positive."""
    if ms is None or not math.isfinite(ms) or ms <= 0:
        return math.nan
    return nbytes / (ms * 1e-3) / 1e9


def frac_of_copy(point_gbps: float, copy_gbps: float) -> float:
    """A point's effective bandwidth as a fraction of the measured copy bandwidth (NaN if either is missing)."""
    if not (math.isfinite(point_gbps) and math.isfinite(copy_gbps)) or copy_gbps <= 0:
        return math.nan
    return point_gbps / copy_gbps
