"""Host launchers of Linear / 1x1-convolution + BatchNorm + activation: check, allocate, launch.

Training forward, 3T of Z/Y traffic (T = one pass over the [M, N] output):
  1. ``_gemm_bn_stats_kernel``: Z = X @ W^T (writes Z: 1T) and per-row-tile partial (count, mean, M2) per column;
  2. ``_gemm_partials_merge_kernel``: the partials merged in a fixed order (past MAX_PARTIALS partials, one per
     128-row tile, first in parallel groups, then one group per channel block), then fp32 mean and rstd and the
     running-statistics update as a few (N,)-sized tensor ops;
  3. ``bn_act_apply``'s kernel: Y = act((Z - mean) * rstd * gamma + beta) (reads Z, writes Y: 2T).
Eval forward: the matmul without statistics, then ``bn_act_fwd_eval`` (3T; Z is kept for the backward).
Inference (no gradient wanted): ``_gemm_bn_act_eval_kernel`` applies BatchNorm and the activation in the
matmul's epilogue (1T: only Y is written).
Every launch goes through ``launchers._launch`` (the direct launch of the compiled kernel, ``_launch.py``).

No autograd here (``bnbench.linear_bn`` wraps these). X is read through its strides (no copy); Z and Y are
contiguous [M, N], which for a convolution is the channels_last layout of [batch, N, H, W].
"""

from __future__ import annotations

import dataclasses

import torch

from . import launchers as _bn
from ._gemm import _gemm_bn_act_eval_kernel, _gemm_bn_stats_kernel, _gemm_partials_merge_kernel
from ._plan import cdiv, next_pow2

__all__ = [
    "INPUT_PRECISIONS",
    "GemmConfig",
    "default_gemm_config",
    "gemm_bn_stats",
    "linear_bn_act_fwd_eval",
    "linear_bn_act_fwd_train",
    "linear_bn_act_infer",
]

#: how fp32 operands are multiplied: "ieee" (exact fp32 products, nn.Linear's default) or "tf32" (tensor cores)
INPUT_PRECISIONS = ("ieee", "tf32")


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiles of the matmul: BLOCK_SIZE_M rows (one statistics partial each), BLOCK_SIZE_N columns, K steps of
    BLOCK_SIZE_K; GROUP_SIZE_M row tiles per L2 group; warps and software-pipelining stages."""

    block_size_m: int
    block_size_n: int
    block_size_k: int
    group_size_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_size_m", "block_size_n", "block_size_k", "group_size_m", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= 1, got {value}")
        if self.num_stages < 1:
            raise ValueError(f"GemmConfig.num_stages must be >= 1, got {self.num_stages}")

    def describe(self) -> str:
        return (
            f"gemm:bm{self.block_size_m}xbn{self.block_size_n}xbk{self.block_size_k}"
            f":g{self.group_size_m}:w{self.num_warps}:s{self.num_stages}"
        )


def default_gemm_config(
    M: int,
    N: int,
    K: int,
    element_size: int,
    device: torch.device,
    input_precision: str = "ieee",
    bn_act_epilogue: bool = False,
) -> GemmConfig:
    """Tiles for Hopper-class GPUs, checked with ptxas for sm_90 under Triton 3.6 and 3.9
    (tests/test_gemm_compile.py: at most 128 registers, no spills, pipelined loads). fp16/bf16 on tensor cores:
    128x128 tiles (the statistics partials are then 1/64 of Z's bytes or less), K steps of 64, 8 warps, 4
    stages. tf32: 128x64x32 (128x128 takes 172 registers under Triton 3.6). Exact fp32 ("ieee", FMA): 64x64x16,
    8 warps, 3 stages (64x64x32 spills under Triton 3.6). The inference kernel (``bn_act_epilogue``: BatchNorm
    + activation on the tile, three per-column vectors held per thread) takes at most 64 columns. Small M or N
    shrink the tile (tensor-core tiles need every side >= 16). Under the interpreter, 16-wide tiles keep the
    simulated programs small."""
    if device.type != "cuda":
        return GemmConfig(16, 16, 16, group_size_m=2, num_warps=1, num_stages=1)
    exact_fp32 = element_size == 4 and input_precision == "ieee"
    cap = 64 if exact_fp32 else 128
    block_m = max(16, min(cap, next_pow2(M)))
    block_n = max(16, min(64 if bn_act_epilogue or element_size == 4 else cap, next_pow2(N)))
    block_k = max(16, min(64 if element_size == 2 else 16 if exact_fp32 else 32, next_pow2(K)))
    num_warps = 8 if exact_fp32 or block_m * block_n >= 128 * 64 else 4
    return GemmConfig(block_m, block_n, block_k, group_size_m=8, num_warps=num_warps, num_stages=3 if exact_fp32 else 4)


def _alloc_z(shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """The matmul output (tests poison it)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype)


def _rows_view(x: torch.Tensor) -> tuple[int, int, int, int, tuple[int, int, int, int], bool]:
    """X as [M, K]: (M, K, H, W, (stride_n, stride_h, stride_w, stride_k), split_rows). A 4-D input
    [batch, K, H, W] has rows (n, h, w); they are one strided axis when the layout allows (channels_last)."""
    if x.dim() == 2:
        return x.shape[0], x.shape[1], 1, 1, (x.stride(0), 0, 0, x.stride(1)), False
    B, K, H, W = x.shape
    sn, sk, sh, sw = x.stride()
    if H * W == 1:
        return B, K, 1, 1, (sn, 0, 0, sk), False
    mergeable = (H == 1 or W == 1 or sh == W * sw) and (B == 1 or sn == H * (sh if H > 1 else W * sw))
    if mergeable:
        row = sw if W > 1 else sh
        return B * H * W, K, H, W, (row, 0, 0, sk), False
    return B * H * W, K, H, W, (sn, sh, sw, sk), True


def _check_gemm_operands(x: torch.Tensor, weight: torch.Tensor, input_precision: str) -> None:
    for name, t in (("input", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _bn.SUPPORTED_DTYPES:
        raise TypeError(f"input has dtype {x.dtype}; the Triton matmul supports float32, float16 and bfloat16")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but input has {x.dtype}; they must match")
    if x.dim() not in (2, 4):
        raise ValueError(f"input must be 2-D [M, K] or 4-D [batch, K, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have shape (out_features, {x.shape[1]}) to match input {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but input is on {x.device}")
    if x.device.type != "cuda" and not _bn.interpreter_active():
        raise ValueError(
            f"input is on {x.device}; the Triton kernels run on CUDA tensors, or on CPU tensors only when "
            "TRITON_INTERPRET=1 was set before triton was imported"
        )
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")


def gemm_bn_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stats: bool = True,
    input_precision: str = "ieee",
    config: GemmConfig | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None]:
    """Z = X @ weight^T as a contiguous [M, N] tensor of x's dtype and, with ``stats``, the partial statistics
    ``(count[P], part_mean[P, N], part_m2[P, N], P)`` of its P = cdiv(M, BLOCK_SIZE_M) row tiles (else None)."""
    _check_gemm_operands(x, weight, input_precision)
    M, K, H, W, (sn, sh, sw, sk), split = _rows_view(x)
    N = weight.shape[0]
    z = _alloc_z((M, N), x)
    if M == 0 or N == 0:
        return z, None
    cfg = config or default_gemm_config(M, N, K, x.element_size(), x.device, input_precision)
    P = cdiv(M, cfg.block_size_m)
    if stats:
        count = torch.empty(P, device=x.device, dtype=torch.float32)
        part_mean = torch.empty((P, N), device=x.device, dtype=torch.float32)
        part_m2 = torch.empty((P, N), device=x.device, dtype=torch.float32)
    else:
        count = part_mean = part_m2 = z  # not touched
    grid = (P * cdiv(N, cfg.block_size_n),)
    _bn._launch(_gemm_bn_stats_kernel, grid,
        x, weight, z, count, part_mean, part_m2,
        M, N, K, H, W, sn, sh, sw, sk, weight.stride(0), weight.stride(1), z.stride(0), z.stride(1),
        STATS=stats, SPLIT_ROWS=split, INPUT_PRECISION=input_precision,
        UPCAST=x.dtype == torch.bfloat16 and _bn.interpreter_active(),
        BLOCK_SIZE_M=cfg.block_size_m, BLOCK_SIZE_N=cfg.block_size_n, BLOCK_SIZE_K=cfg.block_size_k,
        GROUP_SIZE_M=cfg.group_size_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return z, ((count, part_mean, part_m2, P) if stats else None)


#: more statistics partials than this are first merged in groups (``_gemm_partials_merge_kernel``)
MAX_PARTIALS = 512


def _merge_groups(partials, rows: int):
    """Merge each group of ``rows`` consecutive partials into one (``_gemm_partials_merge_kernel``, all groups in
    parallel, in a fixed order within each): (count, part_mean, part_m2, groups)."""
    count, part_mean, part_m2, P = partials
    N = part_mean.shape[1]
    groups = cdiv(P, rows)
    block_r = next_pow2(rows)
    block_c = max(1, min(next_pow2(N), 4096 // block_r))
    out_count = torch.empty(groups, device=count.device, dtype=torch.float32)
    out_mean = torch.empty((groups, N), device=count.device, dtype=torch.float32)
    out_m2 = torch.empty((groups, N), device=count.device, dtype=torch.float32)
    _bn._launch(_gemm_partials_merge_kernel, (groups, cdiv(N, block_c)),
        count, part_mean, part_m2, out_count, out_mean, out_m2, P, N, rows,
        BLOCK_SIZE_R=block_r, BLOCK_SIZE_C=block_c, num_warps=8,
    )  # fmt: skip
    return out_count, out_mean, out_m2, groups


def _combine_partials(partials, mean, rstd, running_mean, running_var, *, eps: float, momentum: float) -> None:
    """The batch statistics from the matmul's partials, in a fixed order: past MAX_PARTIALS partials (one per
    row tile) groups are first merged in parallel, then one program per channel block merges the rest; then
    mean and rstd = 1/sqrt(M2/n + eps) (biased variance) are written and the running statistics updated with the
    unbiased variance M2/(n - 1), as nn.BatchNorm does (a few (N,)-sized ops)."""
    count, part_mean, part_m2, P = partials
    if P > MAX_PARTIALS:
        count, part_mean, part_m2, P = _merge_groups((count, part_mean, part_m2, P), cdiv(P, MAX_PARTIALS))
    if P > 1:
        count, part_mean, part_m2, P = _merge_groups((count, part_mean, part_m2, P), P)
    total, batch_mean, m2 = count[0], part_mean[0], part_m2[0]
    mean.copy_(batch_mean)
    rstd.copy_(torch.rsqrt(m2 / total + eps))
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(running_mean.float() * (1.0 - momentum) + momentum * batch_mean)
            running_var.copy_(running_var.float() * (1.0 - momentum) + momentum * (m2 / (total - 1.0)))


def _check_vectors(N: int, dtype: torch.dtype, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != N:
            raise ValueError(f"{name} must have shape ({N},) to match out_features={N}, got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, dtype):
            raise TypeError(f"{name} has dtype {t.dtype}; expected float32 or the input's dtype {dtype}")


def linear_bn_act_fwd_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    momentum: float,
    eps: float,
    activation: str,
    act_param: float = 0.0,
    input_precision: str = "ieee",
    config: GemmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward of act(BN(X @ W^T)): returns (y, z, mean, rstd); y and z are [M, N] in x's dtype, mean
    and rstd fp32 (N,). Updates the running statistics in place (unbiased variance, ``momentum``)."""
    _check_gemm_operands(x, weight, input_precision)
    N = weight.shape[0]
    _check_vectors(N, x.dtype, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean,
                   running_var=running_var)  # fmt: skip
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    M = _rows_view(x)[0]
    if M < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    act = _bn._activation_name(activation)
    z, partials = gemm_bn_stats(x, weight, stats=True, input_precision=input_precision, config=config)
    mean = torch.empty(N, device=x.device, dtype=torch.float32)
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    if N == 0:
        return z.clone(), z, mean, rstd
    _combine_partials(partials, mean, rstd, running_mean, running_var, eps=eps, momentum=momentum)
    y = _bn.bn_act_apply(z, mean, rstd, bn_weight, bn_bias, activation=act, act_param=act_param)
    return y, z, mean, rstd


def linear_bn_act_fwd_eval(
    x: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    *,
    eps: float,
    activation: str,
    act_param: float = 0.0,
    input_precision: str = "ieee",
    config: GemmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval forward with the running statistics: returns (y, z), both [M, N] in x's dtype."""
    _check_gemm_operands(x, weight, input_precision)
    N = weight.shape[0]
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be given in evaluation mode")
    _check_vectors(N, x.dtype, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean,
                   running_var=running_var)  # fmt: skip
    act = _bn._activation_name(activation)
    z, _ = gemm_bn_stats(x, weight, stats=False, input_precision=input_precision, config=config)
    y = _bn.bn_act_fwd_eval(z, running_mean, running_var, bn_weight, bn_bias, eps=eps, activation=act,
                            act_param=act_param)  # fmt: skip
    return y, z


def linear_bn_act_infer(
    x: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    *,
    eps: float,
    activation: str,
    act_param: float = 0.0,
    input_precision: str = "ieee",
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Inference: y = act((X @ W^T - running_mean) / sqrt(running_var + eps) * bn_weight + bn_bias), [M, N] in
    x's dtype, in one launch (Z is never written: nothing is kept for a backward)."""
    _check_gemm_operands(x, weight, input_precision)
    N = weight.shape[0]
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be given in evaluation mode")
    _check_vectors(N, x.dtype, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean,
                   running_var=running_var)  # fmt: skip
    act = _bn._activation_name(activation)
    M, K, H, W, (sn, sh, sw, sk), split = _rows_view(x)
    y = _alloc_z((M, N), x)
    if M == 0 or N == 0:
        return y
    cfg = config or default_gemm_config(M, N, K, x.element_size(), x.device, input_precision, bn_act_epilogue=True)
    grid = (cdiv(M, cfg.block_size_m) * cdiv(N, cfg.block_size_n),)
    _bn._launch(_gemm_bn_act_eval_kernel, grid,
        x, weight, y, running_mean, running_var,
        bn_weight if bn_weight is not None else running_mean, bn_bias if bn_bias is not None else running_mean,
        M, N, K, H, W, float(eps), float(act_param),
        sn, sh, sw, sk, weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        ACTIVATION=act, HAS_WEIGHT=bn_weight is not None, HAS_BIAS=bn_bias is not None,
        SPLIT_ROWS=split, INPUT_PRECISION=input_precision,
        UPCAST=x.dtype == torch.bfloat16 and _bn.interpreter_active(),
        BLOCK_SIZE_M=cfg.block_size_m, BLOCK_SIZE_N=cfg.block_size_n, BLOCK_SIZE_K=cfg.block_size_k,
        GROUP_SIZE_M=cfg.group_size_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y
