"""Forward kernels: batch statistics (split reduction + combine, or one fused pass) and normalise + activation.

Training forward, large inputs (3 launches, 3T of traffic):
  1. ``_bn_act_fwd_stats_kernel``   grid (P, cdiv(C, BLOCK_SIZE_C)): program p merges its tiles with Chan's
     formula into a partial (count, mean, M2) per channel.
  2. ``_bn_act_fwd_combine_kernel`` grid (cdiv(C, BLOCK_SIZE_C),): merges the P partials in a fixed order,
     writes fp32 mean and rstd, and updates the running statistics.
  3. ``_bn_act_fwd_apply_kernel``   grid (tiles, cdiv(C, BLOCK_SIZE_C)): y = act((x - mean) * rstd * w + b).
Training forward, small inputs: ``_bn_act_fwd_fused_kernel`` does all three for a channel block in one launch.
Eval forward: ``_bn_act_fwd_apply_kernel`` with RSTD_FROM_VAR, reading the running statistics.
"""

import triton
import triton.language as tl

from ._common import (
    _activation,
    _channel_block,
    _index,
    _load_channel_affine,
    _load_channel_stats,
    _offsets,
    _tile_rows,
)


@triton.jit
def _welford_tiles(
    x_ptr, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Per-channel (count, mean, M2) over tiles [tile_begin, tile_end), merged tile by tile (Chan et al.).

    Everything is computed on deviations from a pivot (each channel's first element in this range), and each
    tile's own mean and M2 exactly in registers, so a channel with |mean| >> std loses nothing to cancellation
    and its mean carries a single rounding.
    """
    tile_n0 = tile_begin // n_tiles_s
    n0 = _index(tile_n0, INDEX_64) * BLOCK_SIZE_N + tl.arange(0, 1)
    s0 = _index(tile_begin - tile_n0 * n_tiles_s, INDEX_64) * BLOCK_SIZE_S + tl.arange(0, 1)
    pivot_offs = _offsets(n0, c, s0, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h, SPLIT_S)
    pivot = tl.load(x_ptr + pivot_offs, mask=c_mask[None, :, None], other=0.0).to(tl.float32)
    pivot = tl.sum(tl.sum(pivot, axis=2), axis=0)
    count = tl.zeros((), tl.float32)
    mean = tl.zeros((BLOCK_SIZE_C,), tl.float32)  # of the deviations from the pivot
    m2 = tl.zeros((BLOCK_SIZE_C,), tl.float32)
    for tile in range(tile_begin, tile_end):
        n, s, n_mask, s_mask, tile_count = _tile_rows(tile, n_tiles_s, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64)
        mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
        offs = _offsets(n, c, s, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h, SPLIT_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dev = tl.where(mask, x - pivot[None, :, None], 0.0)
        tile_mean = tl.sum(tl.sum(dev, axis=2), axis=0) / tile_count
        centred = tl.where(mask, dev - tile_mean[None, :, None], 0.0)
        tile_m2 = tl.sum(tl.sum(centred * centred, axis=2), axis=0)
        new_count = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / new_count)
        m2 += tile_m2 + delta * delta * (count * tile_count / new_count)
        count = new_count
    return count, pivot + mean, m2


@triton.jit
def _finalize_stats(
    mean, m2, count, c, c_mask, mean_ptr, rstd_ptr, running_mean_ptr, running_var_ptr, eps, momentum,
    HAS_RUNNING: tl.constexpr,
):  # fmt: skip
    """Write fp32 mean and rstd = 1/sqrt(var + eps) (biased var); update the running statistics in place:
    running = (1 - momentum) * running + momentum * batch, with the unbiased variance."""
    var = m2 / count
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(rstd_ptr + c, rstd, mask=c_mask)
    if HAS_RUNNING:
        unbiased = m2 / (count - 1.0)
        r_mean = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0)
        r_var = tl.load(running_var_ptr + c, mask=c_mask, other=0.0)
        new_mean = r_mean.to(tl.float32) * (1.0 - momentum) + momentum * mean
        new_var = r_var.to(tl.float32) * (1.0 - momentum) + momentum * unbiased
        tl.store(running_mean_ptr + c, new_mean.to(r_mean.dtype), mask=c_mask)
        tl.store(running_var_ptr + c, new_var.to(r_var.dtype), mask=c_mask)
    return rstd


@triton.jit
def _apply_tiles(
    x_ptr, y_ptr, mean, scale, bias, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_y_n, stride_y_c, stride_y_s, stride_y_h,
    act_param, ACTIVATION: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_S: tl.constexpr, SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """y = act((x - mean) * scale + bias) over tiles [tile_begin, tile_end); scale = rstd * weight.

    (x - mean) is formed first: folding the mean into the shift would cancel catastrophically when
    |mean| >> std.
    """
    for tile in range(tile_begin, tile_end):
        n, s, n_mask, s_mask, _ = _tile_rows(tile, n_tiles_s, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64)
        mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
        x_offs = _offsets(n, c, s, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h, SPLIT_S)
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean[None, :, None]) * scale[None, :, None] + bias[None, :, None]
        y = _activation(z, ACTIVATION, act_param)
        y_offs = _offsets(n, c, s, W, stride_y_n, stride_y_c, stride_y_s, stride_y_h, SPLIT_S)
        tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_fwd_stats_kernel(
    x_ptr, count_ptr, part_mean_ptr, part_m2_ptr,
    N, C, S, W, n_tiles, n_tiles_s, tiles_per_program,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Partial statistics of x [N, C, S]. Grid (P, cdiv(C, BLOCK_SIZE_C)).

    Program (p, c-block) merges tiles [p * tiles_per_program, (p + 1) * tiles_per_program) and writes
    count[p] (elements per channel), part_mean[p, c] and part_m2[p, c] = sum (x - part_mean[p, c])^2.
    """
    pid_p = tl.program_id(0)
    c = _channel_block(tl.program_id(1), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    tile_begin = pid_p * tiles_per_program
    tile_end = tl.minimum(tile_begin + tiles_per_program, n_tiles)
    count, mean, m2 = _welford_tiles(
        x_ptr, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h,
        BLOCK_SIZE_N, BLOCK_SIZE_C, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
    )  # fmt: skip
    row = pid_p.to(tl.int64) * C
    tl.store(part_mean_ptr + row + c, mean, mask=c_mask)
    tl.store(part_m2_ptr + row + c, m2, mask=c_mask)
    if tl.program_id(1) == 0:
        tl.store(count_ptr + pid_p, count)


@triton.jit
def _bn_act_fwd_combine_kernel(
    count_ptr, part_mean_ptr, part_m2_ptr, mean_ptr, rstd_ptr, running_mean_ptr, running_var_ptr,
    P, C, total, eps, momentum,
    HAS_RUNNING: tl.constexpr, FINALIZE: tl.constexpr, BLOCK_SIZE_P: tl.constexpr, BLOCK_SIZE_C: tl.constexpr,
):  # fmt: skip
    """Merge P partials per channel in a fixed order. Grid (cdiv(C, BLOCK_SIZE_C),).

    Reads count[P], part_mean[P, C], part_m2[P, C]; n = ``total``. mean = K + sum_p n_p (mean_p - K) / n with
    K = mean_0 (shifted, so no cancellation), then M2 = sum_p M2_p + n_p (mean_p - mean)^2. FINALIZE: write
    mean[C] and rstd[C] = 1 / sqrt(M2 / n + eps) and update running_mean/running_var[C] in place; otherwise
    write mean and M2 into ``mean_ptr`` and ``rstd_ptr`` (local statistics to merge across ranks).
    """
    c = tl.program_id(0).to(tl.int64) * BLOCK_SIZE_C + tl.arange(0, BLOCK_SIZE_C)
    c_mask = c < C
    shift = tl.load(part_mean_ptr + c, mask=c_mask, other=0.0)
    acc = tl.zeros((BLOCK_SIZE_C,), tl.float32)
    for p0 in range(0, P, BLOCK_SIZE_P):
        p = p0 + tl.arange(0, BLOCK_SIZE_P)
        p_mask = p < P
        mask = p_mask[:, None] & c_mask[None, :]
        cnt = tl.load(count_ptr + p, mask=p_mask, other=0.0)
        mu = tl.load(part_mean_ptr + p.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0)
        acc += tl.sum(tl.where(mask, cnt[:, None] * (mu - shift[None, :]), 0.0), axis=0)
    mean = shift + acc / total
    m2 = tl.zeros((BLOCK_SIZE_C,), tl.float32)
    for p0 in range(0, P, BLOCK_SIZE_P):
        p = p0 + tl.arange(0, BLOCK_SIZE_P)
        p_mask = p < P
        mask = p_mask[:, None] & c_mask[None, :]
        cnt = tl.load(count_ptr + p, mask=p_mask, other=0.0)
        offs = p.to(tl.int64)[:, None] * C + c[None, :]
        mu = tl.load(part_mean_ptr + offs, mask=mask, other=0.0)
        pm2 = tl.load(part_m2_ptr + offs, mask=mask, other=0.0)
        delta = mu - mean[None, :]
        m2 += tl.sum(tl.where(mask, pm2 + cnt[:, None] * delta * delta, 0.0), axis=0)
    if FINALIZE:
        _finalize_stats(
            mean, m2, total, c, c_mask, mean_ptr, rstd_ptr, running_mean_ptr, running_var_ptr, eps, momentum,
            HAS_RUNNING,
        )  # fmt: skip
    else:
        tl.store(mean_ptr + c, mean, mask=c_mask)
        tl.store(rstd_ptr + c, m2, mask=c_mask)


@triton.jit
def _bn_act_fwd_apply_kernel(
    x_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr,
    N, C, S, W, n_tiles, n_tiles_s, tiles_per_program, eps, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_y_n, stride_y_c, stride_y_s, stride_y_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RSTD_FROM_VAR: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """y = act((x - mean) * rstd * w + b), elementwise over x, y [N, C, S] (each through its strides).
    Grid (cdiv(n_tiles, tiles_per_program), cdiv(C, BLOCK_SIZE_C)).

    mean, weight, bias are [C]; ``var_ptr`` holds rstd [C] (training, from the combine step) or the running
    variance [C] (eval, RSTD_FROM_VAR: rstd = 1 / sqrt(var + eps)).
    """
    c = _channel_block(tl.program_id(1), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    mean, rstd = _load_channel_stats(mean_ptr, var_ptr, c, c_mask, eps, RSTD_FROM_VAR)
    w, b = _load_channel_affine(weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT, HAS_BIAS)
    tile_begin = tl.program_id(0) * tiles_per_program
    tile_end = tl.minimum(tile_begin + tiles_per_program, n_tiles)
    _apply_tiles(
        x_ptr, y_ptr, mean, rstd * w, b, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_y_n, stride_y_c, stride_y_s, stride_y_h,
        act_param, ACTIVATION, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
    )  # fmt: skip


@triton.jit
def _bn_act_fwd_fused_kernel(
    x_ptr, y_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
    N, C, S, W, n_tiles, n_tiles_s, eps, momentum, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_y_n, stride_y_c, stride_y_s, stride_y_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Whole training forward for one channel block in one launch (small inputs, where launches dominate).

    Grid (cdiv(C, BLOCK_SIZE_C),). Over x [N, C, S]: the statistics over all tiles (as the stats and combine
    kernels compute them), writes mean[C], rstd[C], updates running_mean/running_var[C], then
    y = act((x - mean) * rstd * w + b) (whose second read of x mostly hits cache).
    """
    c = _channel_block(tl.program_id(0), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    count, mean, m2 = _welford_tiles(
        x_ptr, c, c_mask, 0, n_tiles, n_tiles_s, N, S, W,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h,
        BLOCK_SIZE_N, BLOCK_SIZE_C, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
    )  # fmt: skip
    rstd = _finalize_stats(
        mean, m2, count, c, c_mask, mean_ptr, rstd_ptr, running_mean_ptr, running_var_ptr, eps, momentum,
        HAS_RUNNING,
    )  # fmt: skip
    w, b = _load_channel_affine(weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT, HAS_BIAS)
    _apply_tiles(
        x_ptr, y_ptr, mean, rstd * w, b, c, c_mask, 0, n_tiles, n_tiles_s, N, S, W,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_y_n, stride_y_c, stride_y_s, stride_y_h,
        act_param, ACTIVATION, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, INDEX_64,
    )  # fmt: skip
