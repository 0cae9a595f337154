"""Backward kernels: recompute z from x, reduce two per-channel sums, then dx elementwise.

With x_hat = (x - mean) * rstd, z = x_hat * w + b and dz = dy * act'(z):
  dbias = sum(dz), dweight = sum(dz * x_hat), and in training
  dx = w * rstd * (dz - sum(dz) / M - x_hat * sum(dz * x_hat) / M)   (M = N*S);
  in eval (running statistics are constants) dx = w * rstd * dz.

Large inputs (3 launches, 5T of traffic): ``_bn_act_bwd_reduce_kernel`` (grid (P, C blocks), partial sums;
in eval it also writes dx), ``_bn_act_bwd_combine_kernel`` (fixed-order sum of the P partials: no atomics,
bitwise reproducible), ``_bn_act_bwd_dx_kernel`` (training only). Small inputs: ``_bn_act_bwd_fused_kernel``.
"""

import triton
import triton.language as tl

from ._common import (
    _activation_grad,
    _channel_block,
    _load_channel_affine,
    _load_channel_stats,
    _offsets,
    _tile_rows,
)


@triton.jit
def _grad_tile(
    x_ptr, dy_ptr, n, c, s, mask, W, mean, rstd, w, b, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    ACTIVATION: tl.constexpr, SPLIT_S: tl.constexpr,
):  # fmt: skip
    """(x_hat, dz) of one tile, in fp32; both are 0 where the mask is off."""
    x_offs = _offsets(n, c, s, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h, SPLIT_S)
    dy_offs = _offsets(n, c, s, W, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h, SPLIT_S)
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0).to(tl.float32)
    x_hat = tl.where(mask, (x - mean[None, :, None]) * rstd[None, :, None], 0.0)
    if ACTIVATION == "identity":
        dz = dy
    else:
        z = x_hat * w[None, :, None] + b[None, :, None]
        dz = dy * _activation_grad(z, ACTIVATION, act_param)
    return x_hat, dz


@triton.jit
def _reduce_tiles(
    x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
    ACTIVATION: tl.constexpr, WRITE_DX: tl.constexpr, BLOCK_SIZE_C: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_S: tl.constexpr, SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Per-channel sum(dz) and sum(dz * x_hat) over tiles; with WRITE_DX (eval) also dx = w * rstd * dz."""
    sum_dz = tl.zeros((BLOCK_SIZE_C,), tl.float32)
    sum_dz_xhat = tl.zeros((BLOCK_SIZE_C,), tl.float32)
    for tile in range(tile_begin, tile_end):
        n, s, n_mask, s_mask, _ = _tile_rows(tile, n_tiles_s, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64)
        mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
        x_hat, dz = _grad_tile(
            x_ptr, dy_ptr, n, c, s, mask, W, mean, rstd, w, b, act_param,
            stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
            ACTIVATION, SPLIT_S,
        )  # fmt: skip
        sum_dz += tl.sum(tl.sum(dz, axis=2), axis=0)
        sum_dz_xhat += tl.sum(tl.sum(dz * x_hat, axis=2), axis=0)
        if WRITE_DX:
            dx = dz * (w * rstd)[None, :, None]
            dx_offs = _offsets(n, c, s, W, stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h, SPLIT_S)
            tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    return sum_dz, sum_dz_xhat


@triton.jit
def _dx_tiles(
    x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, mean_dz, mean_dz_xhat, c, c_mask, tile_begin, tile_end,
    n_tiles_s, N, S, W, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
    ACTIVATION: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_S: tl.constexpr, SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Training dx = w * rstd * (dz - mean(dz) - x_hat * mean(dz * x_hat)) over tiles."""
    for tile in range(tile_begin, tile_end):
        n, s, n_mask, s_mask, _ = _tile_rows(tile, n_tiles_s, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64)
        mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
        x_hat, dz = _grad_tile(
            x_ptr, dy_ptr, n, c, s, mask, W, mean, rstd, w, b, act_param,
            stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
            ACTIVATION, SPLIT_S,
        )  # fmt: skip
        dx = (dz - mean_dz[None, :, None] - x_hat * mean_dz_xhat[None, :, None]) * (w * rstd)[None, :, None]
        dx_offs = _offsets(n, c, s, W, stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h, SPLIT_S)
        tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_bwd_reduce_kernel(
    x_ptr, dy_ptr, dx_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, part_dz_ptr, part_dz_xhat_ptr,
    N, C, S, W, n_tiles, n_tiles_s, tiles_per_program, eps, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Partial sums. Grid (P, cdiv(C, BLOCK_SIZE_C)); writes part_dz[P, C], part_dz_xhat[P, C] (and dx in eval).

    ``var_ptr`` holds the saved rstd (training) or the running variance (eval).
    """
    pid_p = tl.program_id(0)
    c = _channel_block(tl.program_id(1), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    mean, rstd = _load_channel_stats(mean_ptr, var_ptr, c, c_mask, eps, not TRAINING)
    w, b = _load_channel_affine(weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT, HAS_BIAS)
    tile_begin = pid_p * tiles_per_program
    tile_end = tl.minimum(tile_begin + tiles_per_program, n_tiles)
    sum_dz, sum_dz_xhat = _reduce_tiles(
        x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W,
        act_param,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
        stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
        ACTIVATION, not TRAINING, BLOCK_SIZE_C, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
    )  # fmt: skip
    row = pid_p.to(tl.int64) * C
    tl.store(part_dz_ptr + row + c, sum_dz, mask=c_mask)
    tl.store(part_dz_xhat_ptr + row + c, sum_dz_xhat, mask=c_mask)


@triton.jit
def _bn_act_bwd_combine_kernel(
    part_dz_ptr, part_dz_xhat_ptr, sum_dz_ptr, sum_dz_xhat_ptr, dweight_ptr, dbias_ptr, P, C,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_SIZE_P: tl.constexpr, BLOCK_SIZE_C: tl.constexpr,
):  # fmt: skip
    """Sum P partials per channel in a fixed order. Grid (cdiv(C, BLOCK_SIZE_C),).

    Writes the fp32 sums (for dx) and dweight = sum(dz * x_hat), dbias = sum(dz) in the parameters' dtype.
    """
    c = tl.program_id(0).to(tl.int64) * BLOCK_SIZE_C + tl.arange(0, BLOCK_SIZE_C)
    c_mask = c < C
    sum_dz = tl.zeros((BLOCK_SIZE_C,), tl.float32)
    sum_dz_xhat = tl.zeros((BLOCK_SIZE_C,), tl.float32)
    for p0 in range(0, P, BLOCK_SIZE_P):
        p = p0 + tl.arange(0, BLOCK_SIZE_P)
        mask = (p < P)[:, None] & c_mask[None, :]
        offs = p.to(tl.int64)[:, None] * C + c[None, :]
        sum_dz += tl.sum(tl.load(part_dz_ptr + offs, mask=mask, other=0.0), axis=0)
        sum_dz_xhat += tl.sum(tl.load(part_dz_xhat_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(sum_dz_ptr + c, sum_dz, mask=c_mask)
    tl.store(sum_dz_xhat_ptr + c, sum_dz_xhat, mask=c_mask)
    if HAS_WEIGHT:
        tl.store(dweight_ptr + c, sum_dz_xhat.to(dweight_ptr.dtype.element_ty), mask=c_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + c, sum_dz.to(dbias_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _bn_act_bwd_dx_kernel(
    x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, sum_dz_ptr, sum_dz_xhat_ptr,
    N, C, S, W, n_tiles, n_tiles_s, tiles_per_program, total, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Training dx, elementwise. Grid (cdiv(n_tiles, tiles_per_program), cdiv(C, BLOCK_SIZE_C))."""
    c = _channel_block(tl.program_id(1), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0)
    w, b = _load_channel_affine(weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT, HAS_BIAS)
    inv_total = 1.0 / total
    mean_dz = tl.load(sum_dz_ptr + c, mask=c_mask, other=0.0) * inv_total
    mean_dz_xhat = tl.load(sum_dz_xhat_ptr + c, mask=c_mask, other=0.0) * inv_total
    tile_begin = tl.program_id(0) * tiles_per_program
    tile_end = tl.minimum(tile_begin + tiles_per_program, n_tiles)
    _dx_tiles(
        x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, mean_dz, mean_dz_xhat, c, c_mask, tile_begin, tile_end,
        n_tiles_s, N, S, W, act_param,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
        stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
        ACTIVATION, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
    )  # fmt: skip


@triton.jit
def _bn_act_bwd_fused_kernel(
    x_ptr, dy_ptr, dx_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, dweight_ptr, dbias_ptr,
    N, C, S, W, n_tiles, n_tiles_s, total, eps, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Whole backward for one channel block in one launch (small inputs). Grid (cdiv(C, BLOCK_SIZE_C),)."""
    c = _channel_block(tl.program_id(0), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    mean, rstd = _load_channel_stats(mean_ptr, var_ptr, c, c_mask, eps, not TRAINING)
    w, b = _load_channel_affine(weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT, HAS_BIAS)
    sum_dz, sum_dz_xhat = _reduce_tiles(
        x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, c, c_mask, 0, n_tiles, n_tiles_s, N, S, W, act_param,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
        stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
        ACTIVATION, not TRAINING, BLOCK_SIZE_C, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
    )  # fmt: skip
    if HAS_WEIGHT:
        tl.store(dweight_ptr + c, sum_dz_xhat.to(dweight_ptr.dtype.element_ty), mask=c_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + c, sum_dz.to(dbias_ptr.dtype.element_ty), mask=c_mask)
    if TRAINING:
        inv_total = 1.0 / total
        _dx_tiles(
            x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, sum_dz * inv_total, sum_dz_xhat * inv_total, c, c_mask,
            0, n_tiles, n_tiles_s, N, S, W, act_param,
            stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s,
            stride_dy_h, stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
            ACTIVATION, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
        )  # fmt: skip
