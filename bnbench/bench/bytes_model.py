"""The minimal-bytes model (docs/measuring.md): how many bytes a pass must move at the least, and effective bandwidth.

T is one full read or write of the activation tensor (numel * element size). A pass that kept everything on chip
would move: training forward 2T (read x, write y), backward 3T (read x and dy, write dx), forward+backward 5T,
eval forward 2T. With a residual added before the activation (``bn_add_act``) the residual is one more read
forward and its gradient one more write backward: 3T, 4T, 7T and 3T. Effective bandwidth = minimal bytes / time, so a kernel that moves more than the minimum shows
up as a lower fraction of the copy bandwidth; a fraction over 1 means cache effects (flag it, do not celebrate).
"""

from __future__ import annotations

import math

from bnbench.schema import ELEMENT_SIZE

__all__ = [
    "ELEMENT_SIZE",
    "MATMUL_BN_ACT_BWD_PASSES",
    "MATMUL_BN_ACT_FWD_PASSES",
    "MIN_TENSOR_PASSES",
    "RESIDUAL_MIN_TENSOR_PASSES",
    "bytes_min",
    "frac_of_copy",
    "gbps",
    "matmul_bn_act_bytes",
]

#: minimal full-tensor passes (reads + writes) per pass kind
MIN_TENSOR_PASSES = {"fwd": 2, "bwd": 3, "fwd_bwd": 5, "eval": 2}
#: the same for act(BN(x) + residual): the forward also reads the residual, the backward also writes its gradient
#: (act'(z) taken from a 1-bit mask or the output's sign, not counted, as the per-channel vectors are not)
RESIDUAL_MIN_TENSOR_PASSES = {"fwd": 3, "bwd": 4, "fwd_bwd": 7, "eval": 3}


def bytes_min(pass_: str, numel: int, dtype: str, residual: bool = False) -> int:
    """Minimal bytes moved by ``pass_`` over a tensor of ``numel`` elements of ``dtype``, with a residual
    added before the activation when ``residual`` (per-channel vectors are ignored: they are C elements against
    N*C*S)."""
    if pass_ not in MIN_TENSOR_PASSES:
        raise ValueError(f"unknown pass {pass_!r}; valid passes are: {', '.join(MIN_TENSOR_PASSES)}")
    if dtype not in ELEMENT_SIZE:
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes are: {', '.join(ELEMENT_SIZE)}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    passes = RESIDUAL_MIN_TENSOR_PASSES if residual else MIN_TENSOR_PASSES
    return passes[pass_] * numel * ELEMENT_SIZE[dtype]


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


# --- Linear / 1x1 convolution + BatchNorm + activation (issue 18) ----------------------------------------------

#: training forward, full passes over the matmul's [M, N] output (Z, then Y) by implementation: the fused op 3T
#: (the matmul writes Z with its statistics from the epilogue; normalise + activation reads Z and writes Y),
#: torch.compile 4T (the matmul writes Z; one fused kernel reads it for the statistics, reads it again and writes
#: Y), eager 6T (the matmul writes Z; BatchNorm reads it twice and writes; the activation reads and writes)
MATMUL_BN_ACT_FWD_PASSES = {"fused": 3, "compile": 4, "eager": 6}
#: the fused op's backward (first version): BatchNorm + activation backward on Z 5T (a reduce reading Z and dY, a
#: pass reading both and writing dZ), then dX = dZ @ W and dW = dZ^T @ X read dZ once each
MATMUL_BN_ACT_BWD_PASSES = 7


def matmul_bn_act_bytes(pass_: str, M: int, K: int, N: int, dtype: str, impl: str = "fused") -> int:
    """Bytes the op X[M, K] -> act(BN(X @ W^T)) [M, N] moves: the Z/Y passes above plus the matmuls' own
    operands (X and W read in the forward; X, W read and dX, dW written in the backward). ``fwd_bwd`` is known
    for the fused op only. Per-channel vectors and the statistics partials are ignored."""
    if pass_ not in ("fwd", "fwd_bwd"):
        raise ValueError(f"pass must be fwd or fwd_bwd for a matmul + BatchNorm op, got {pass_!r}")
    if impl not in MATMUL_BN_ACT_FWD_PASSES:
        raise ValueError(f"unknown implementation {impl!r}; valid: {', '.join(MATMUL_BN_ACT_FWD_PASSES)}")
    if pass_ == "fwd_bwd" and impl != "fused":
        raise ValueError(f"the forward+backward traffic is modelled for the fused op only, not {impl!r}")
    if dtype not in ELEMENT_SIZE:
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes are: {', '.join(ELEMENT_SIZE)}")
    if min(M, K, N) < 0:
        raise ValueError(f"sizes must be >= 0, got M={M}, K={K}, N={N}")
    elements = M * K + N * K + MATMUL_BN_ACT_FWD_PASSES[impl] * M * N
    if pass_ == "fwd_bwd":
        elements += MATMUL_BN_ACT_BWD_PASSES * M * N + 2 * (M * K + N * K)
    return elements * ELEMENT_SIZE[dtype]
