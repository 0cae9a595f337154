"""Memory-saving backward kernels: the gradient of y = act(BN(x)) computed from y instead of x.

In the spirit of in-place activated BatchNorm (Rota Bulo et al., 2018): the forward saves its output y, so the
input x can be freed. Backward inverts the activation and the affine step,
  z = act^-1(y),   x_hat = (z - b) / w,   dz = dy * act'(z),
and then proceeds as :mod:`._backward` does: dbias = sum(dz), dweight = sum(dz * x_hat), and in training
  dx = w * rstd * (dz - sum(dz) / M - x_hat * sum(dz * x_hat) / M)   (M = N*S);
in eval dx = w * rstd * dz. The mean is not needed at all. Only invertible activations qualify: identity and
leaky_relu with a positive slope. ``1 / w`` uses ``sign(w) * max(|w|, min_abs_weight)`` so a zero gamma gives
finite gradients (the information x_hat is then lost: see ``bnbench.functional``).

Large inputs: ``_bn_act_ms_reduce_kernel`` (grid (P, C blocks), partial sums; in eval it also writes dx), the
shared ``_bn_act_bwd_combine_kernel`` (fixed-order sums, no atomics), ``_bn_act_ms_dx_kernel`` (training).
Small inputs: ``_bn_act_ms_fused_kernel``, one program per channel block.
"""

import triton
import triton.language as tl

from ._common import _activation_grad, _channel_block, _load_channel_affine, _offsets, _tile_rows


@triton.jit
def _load_rstd_inv_w(rstd_ptr, weight_ptr, bias_ptr, c, c_mask, eps, min_abs_weight,
                     RSTD_FROM_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """fp32 (rstd, w, b, 1 / guarded w) of a channel block; ``rstd_ptr`` holds the variance when RSTD_FROM_VAR."""
    if RSTD_FROM_VAR:
        var = tl.load(rstd_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(var + eps)
    else:
        rstd = tl.load(rstd_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    w, b = _load_channel_affine(weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT, HAS_BIAS)
    guarded = tl.maximum(tl.abs(w), min_abs_weight)
    inv_w = tl.where(w < 0.0, -1.0 / guarded, 1.0 / guarded)
    return rstd, w, b, inv_w


@triton.jit
def _ms_grad_tile(
    y_ptr, dy_ptr, n, c, s, mask, W, b, inv_w, act_param,
    stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    ACTIVATION: tl.constexpr, SPLIT_S: tl.constexpr,
):  # fmt: skip
    """(x_hat, dz) of one tile reconstructed from y, in fp32; both are 0 where the mask is off."""
    y_offs = _offsets(n, c, s, W, stride_y_n, stride_y_c, stride_y_s, stride_y_h, SPLIT_S)
    dy_offs = _offsets(n, c, s, W, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h, SPLIT_S)
    y = tl.load(y_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == "identity":
        z = y
        dz = dy
    else:
        tl.static_assert(ACTIVATION == "leaky_relu", "memory-saving backward needs an invertible activation")
        z = tl.where(y > 0.0, y, y / act_param)
        dz = dy * _activation_grad(z, ACTIVATION, act_param)
    x_hat = tl.where(mask, (z - b[None, :, None]) * inv_w[None, :, None], 0.0)
    return x_hat, dz  # dz is 0 off the mask: dy loads as 0 there


@triton.jit
def _ms_reduce_tiles(
    y_ptr, dy_ptr, dx_ptr, rstd, w, b, inv_w, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W, act_param,
    stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
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
        x_hat, dz = _ms_grad_tile(
            y_ptr, dy_ptr, n, c, s, mask, W, b, inv_w, act_param,
            stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
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
def _ms_dx_tiles(
    y_ptr, dy_ptr, dx_ptr, rstd, w, b, inv_w, mean_dz, mean_dz_xhat, c, c_mask, tile_begin, tile_end,
    n_tiles_s, N, S, W, act_param,
    stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
    ACTIVATION: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_S: tl.constexpr, SPLIT_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """Training dx = w * rstd * (dz - mean(dz) - x_hat * mean(dz * x_hat)) over tiles."""
    for tile in range(tile_begin, tile_end):
        n, s, n_mask, s_mask, _ = _tile_rows(tile, n_tiles_s, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64)
        mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
        x_hat, dz = _ms_grad_tile(
            y_ptr, dy_ptr, n, c, s, mask, W, b, inv_w, act_param,
            stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
            ACTIVATION, SPLIT_S,
        )  # fmt: skip
        dx = (dz - mean_dz[None, :, None] - x_hat * mean_dz_xhat[None, :, None]) * (w * rstd)[None, :, None]
        dx_offs = _offsets(n, c, s, W, stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h, SPLIT_S)
        tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_ms_reduce_kernel(
    y_ptr, dy_ptr, dx_ptr, rstd_ptr, weight_ptr, bias_ptr, part_dz_ptr, part_dz_xhat_ptr,
    N, C, S, W, n_tiles, n_tiles_s, tiles_per_program, eps, act_param, min_abs_weight,
    stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Partial sums from y. Grid (P, cdiv(C, BLOCK_SIZE_C)); writes part_dz[P, C], part_dz_xhat[P, C] (and dx
    in eval). ``rstd_ptr`` holds the saved rstd (training) or the running variance (eval)."""
    pid_p = tl.program_id(0)
    c = _channel_block(tl.program_id(1), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    rstd, w, b, inv_w = _load_rstd_inv_w(
        rstd_ptr, weight_ptr, bias_ptr, c, c_mask, eps, min_abs_weight, not TRAINING, HAS_WEIGHT, HAS_BIAS
    )
    tile_begin = pid_p * tiles_per_program
    tile_end = tl.minimum(tile_begin + tiles_per_program, n_tiles)
    sum_dz, sum_dz_xhat = _ms_reduce_tiles(
        y_ptr, dy_ptr, dx_ptr, rstd, w, b, inv_w, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W, act_param,
        stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
        stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
        ACTIVATION, not TRAINING, BLOCK_SIZE_C, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
    )  # fmt: skip
    row = pid_p.to(tl.int64) * C
    tl.store(part_dz_ptr + row + c, sum_dz, mask=c_mask)
    tl.store(part_dz_xhat_ptr + row + c, sum_dz_xhat, mask=c_mask)


@triton.jit
def _bn_act_ms_dx_kernel(
    y_ptr, dy_ptr, dx_ptr, rstd_ptr, weight_ptr, bias_ptr, sum_dz_ptr, sum_dz_xhat_ptr,
    N, C, S, W, n_tiles, n_tiles_s, tiles_per_program, total, act_param, min_abs_weight,
    stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Training dx from y, elementwise. Grid (cdiv(n_tiles, tiles_per_program), cdiv(C, BLOCK_SIZE_C))."""
    c = _channel_block(tl.program_id(1), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    rstd, w, b, inv_w = _load_rstd_inv_w(
        rstd_ptr, weight_ptr, bias_ptr, c, c_mask, 0.0, min_abs_weight, False, HAS_WEIGHT, HAS_BIAS
    )
    inv_total = 1.0 / total
    mean_dz = tl.load(sum_dz_ptr + c, mask=c_mask, other=0.0) * inv_total
    mean_dz_xhat = tl.load(sum_dz_xhat_ptr + c, mask=c_mask, other=0.0) * inv_total
    tile_begin = tl.program_id(0) * tiles_per_program
    tile_end = tl.minimum(tile_begin + tiles_per_program, n_tiles)
    _ms_dx_tiles(
        y_ptr, dy_ptr, dx_ptr, rstd, w, b, inv_w, mean_dz, mean_dz_xhat, c, c_mask, tile_begin, tile_end,
        n_tiles_s, N, S, W, act_param,
        stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
        stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
        ACTIVATION, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
    )  # fmt: skip


@triton.jit
def _bn_act_ms_fused_kernel(
    y_ptr, dy_ptr, dx_ptr, rstd_ptr, weight_ptr, bias_ptr, dweight_ptr, dbias_ptr,
    N, C, S, W, n_tiles, n_tiles_s, total, eps, act_param, min_abs_weight,
    stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Whole memory-saving backward for one channel block in one launch. Grid (cdiv(C, BLOCK_SIZE_C),)."""
    c = _channel_block(tl.program_id(0), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    rstd, w, b, inv_w = _load_rstd_inv_w(
        rstd_ptr, weight_ptr, bias_ptr, c, c_mask, eps, min_abs_weight, not TRAINING, HAS_WEIGHT, HAS_BIAS
    )
    sum_dz, sum_dz_xhat = _ms_reduce_tiles(
        y_ptr, dy_ptr, dx_ptr, rstd, w, b, inv_w, c, c_mask, 0, n_tiles, n_tiles_s, N, S, W, act_param,
        stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
        stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
        ACTIVATION, not TRAINING, BLOCK_SIZE_C, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
    )  # fmt: skip
    if HAS_WEIGHT:
        tl.store(dweight_ptr + c, sum_dz_xhat.to(dweight_ptr.dtype.element_ty), mask=c_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + c, sum_dz.to(dbias_ptr.dtype.element_ty), mask=c_mask)
    if TRAINING:
        inv_total = 1.0 / total
        _ms_dx_tiles(
            y_ptr, dy_ptr, dx_ptr, rstd, w, b, inv_w, sum_dz * inv_total, sum_dz_xhat * inv_total, c, c_mask,
            0, n_tiles, n_tiles_s, N, S, W, act_param,
            stride_y_n, stride_y_c, stride_y_s, stride_y_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
            stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
            ACTIVATION, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
        )  # fmt: skip
