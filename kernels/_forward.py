"""Forward kernels: batch statistics (split reduction with its merge, or one fused pass) and normalise + activation.

Training forward, large inputs (2 launches, 3T of traffic):
  1. ``_bn_act_fwd_stats_kernel``   grid (P, cdiv(C, BLOCK_SIZE_C)): program p reduces its tiles into a partial
     (count, mean, M2) per channel; the last program of each channel block to arrive merges the P partials in
     index order, writes fp32 mean and rstd, and updates the running statistics.
  2. ``_bn_act_fwd_apply_kernel``   grid (tiles, cdiv(C, BLOCK_SIZE_C)): y = act((x - mean) * rstd * w + b).
Training forward, small inputs: ``_bn_act_fwd_fused_kernel`` does all three for a channel block in one launch.
Eval forward: ``_bn_act_fwd_apply_kernel`` with RSTD_FROM_VAR, reading the running statistics.
"""

import triton
import triton.language as tl

from ._common import (
    _STAGES,
    _activation,
    _channel_block,
    _load_channel_affine,
    _load_channel_stats,
    _load_residual,
    _next_tile,
    _offsets,
    _tile_rows,
)


@triton.jit
def _pivot(x_ptr, c, c_mask, stride_x_c):
    """Each channel's first element x[0, c, 0] in fp32: the shift every program of the channel agrees on."""
    return tl.load(x_ptr + c * stride_x_c, mask=c_mask, other=0.0).to(tl.float32)


@triton.jit
def _welford_tiles(
    x_ptr, pivot, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr, INDEX_64: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Per-channel (count, mean - pivot, M2) over tiles [tile_begin, tile_end).

    Every lane of the tile (one (n, s, c) position) runs Welford's update over the tiles it sees, in a loop
    (pipelined when NUM_STAGES > 1: ``tl.range``, cp.async) with no cross-lane work inside it; the lanes are
    merged once after the loop with Chan's formula (:func:`_chan_combine`). Everything is computed on deviations
    from the channel's ``pivot`` (:func:`_pivot`), which every program shares: a channel with |mean| >> std
    loses nothing to cancellation, partials are merged without rounding their means to |mean|'s ulp, and the
    final mean carries a single rounding.
    """
    count = tl.zeros((BLOCK_SIZE_N, 1, BLOCK_SIZE_S), tl.float32)  # per lane; the same for every channel
    mean = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_C, BLOCK_SIZE_S), tl.float32)  # of the deviations from the pivot
    m2 = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_C, BLOCK_SIZE_S), tl.float32)
    for tile in tl.range(tile_begin, tile_end, num_stages=NUM_STAGES):
        n, s, n_mask, s_mask, _ = _tile_rows(tile, n_tiles_s, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64, S_ALIGN)
        rows = n_mask[:, None, None] & s_mask[None, None, :]
        mask = rows & c_mask[None, :, None]
        offs = _offsets(n, c, s, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h, SPLIT_S, S_ALIGN)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dev = x - pivot[None, :, None]
        count += rows.to(tl.float32)
        delta = tl.where(mask, dev - mean, 0.0)
        mean += delta * (1.0 / tl.maximum(count, 1.0))
        m2 += delta * (dev - mean)  # >= 0: (dev - mean) keeps delta's sign; 0 off the mask
    mean, m2, count = tl.reduce((mean, m2, tl.broadcast_to(count, mean.shape)), 2, _chan_combine)
    mean, m2, count = tl.reduce((mean, m2, count), 0, _chan_combine)
    return count, mean, m2


@triton.jit
def _chan_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s merge of two (mean, M2, count) sets: M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.

    An empty side contributes nothing, not inf * 0 = NaN when delta^2 overflows (deviations past about 1.8e19
    in fp32 then give an infinite M2, as PyTorch's variance is, and a finite mean)."""
    n = n_a + n_b
    frac_b = n_b / tl.maximum(n, 1.0)  # counts are whole numbers: 0 when both sides are empty
    delta = mean_b - mean_a
    mean = mean_a + delta * frac_b
    m2 = m2_a + m2_b + tl.where(n_a * n_b > 0.0, delta * delta * (n_a * frac_b), 0.0)
    return mean, m2, n


@triton.jit
def _merge_partials(
    count_ptr, part_mean_ptr, part_m2_ptr, c, c_mask, P, C,
    BLOCK_SIZE_P: tl.constexpr, BLOCK_SIZE_C: tl.constexpr,
):  # fmt: skip
    """(mean, M2, count) of a channel block from P partials (count, part_mean, part_m2, each [P, C]).

    Fixed order, whichever program runs it: lane i of a [BLOCK_SIZE_P, BLOCK_SIZE_C] block merges partials
    i, i + BLOCK_SIZE_P, ... in index order (no cross-lane work in the loop), then one Chan tree over the lanes.
    The partial means are deviations from the channel's pivot, and so is the merged mean. The loads bypass L1
    (``.cg``): the partials were written by other programs.
    """
    mean = tl.zeros((BLOCK_SIZE_P, BLOCK_SIZE_C), tl.float32)
    m2 = tl.zeros((BLOCK_SIZE_P, BLOCK_SIZE_C), tl.float32)
    count = tl.zeros((BLOCK_SIZE_P, BLOCK_SIZE_C), tl.float32)
    for p0 in tl.range(0, P, BLOCK_SIZE_P, num_stages=_STAGES):
        p = p0 + tl.arange(0, BLOCK_SIZE_P)
        p_mask = p < P
        mask = p_mask[:, None] & c_mask[None, :]
        offs = p.to(tl.int64)[:, None] * C + c[None, :]
        cnt = tl.load(count_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        mu = tl.load(part_mean_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        pm2 = tl.load(part_m2_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        mean, m2, count = _chan_combine(mean, m2, count, mu, pm2, cnt)
    mean, m2, count = tl.reduce((mean, m2, count), 0, _chan_combine)
    return mean, m2, count


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
def _x_tile(
    x_ptr, tile, c, c_mask, n_tiles_s, N, S, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_S: tl.constexpr, SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """One tile of x in its own dtype, 0 off the mask."""
    n, s, n_mask, s_mask, _ = _tile_rows(tile, n_tiles_s, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64, S_ALIGN)
    mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
    offs = _offsets(n, c, s, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h, SPLIT_S, S_ALIGN)
    return tl.load(x_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _apply_tiles(
    x, x_ptr, y_ptr, mean, scale, bias, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_y_n, stride_y_c, stride_y_s, stride_y_h,
    act_param, ACTIVATION: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_S: tl.constexpr, SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr, INDEX_64: tl.constexpr,
    PREFETCH: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr = False, res_ptr=None, stride_res_n=0, stride_res_c=0, stride_res_s=0, stride_res_h=0,
):  # fmt: skip
    """y = act((x - mean) * scale + bias [+ residual]) over tiles [tile_begin, tile_end); scale = rstd * weight.
    ``x`` is tile ``tile_begin``, loaded by the caller (:func:`_x_tile`) before the per-channel parameters.

    PREFETCH: each next tile's load is issued before the tile in hand is computed and stored (the compiler
    cannot hoist a load above a store that may alias it), so a program always has a tile in flight while it
    works: two tiles live, 2x the data registers of one. Otherwise after the store (one tile live). The residual
    (HAS_RESIDUAL, through its own strides) is the tile in hand's, loaded where it is added (in flight with the
    next x tile when prefetching; never a prefetched tile of its own). (x - mean) is formed first: folding the
    mean into the shift would cancel catastrophically when |mean| >> std.
    """
    for tile in range(tile_begin, tile_end):
        next_tile = _next_tile(tile, tile_end, n_tiles_s, N, BLOCK_SIZE_N)
        if PREFETCH:
            x_next = _x_tile(
                x_ptr, next_tile, c, c_mask, n_tiles_s, N, S, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h,
                BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
            )  # fmt: skip
        n, s, n_mask, s_mask, _ = _tile_rows(tile, n_tiles_s, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64, S_ALIGN)
        mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
        z = (x.to(tl.float32) - mean[None, :, None]) * scale[None, :, None] + bias[None, :, None]
        z = _load_residual(
            z, res_ptr, n, c, s, mask, W, stride_res_n, stride_res_c, stride_res_s, stride_res_h, SPLIT_S, S_ALIGN,
            HAS_RESIDUAL,
        )  # fmt: skip
        y = _activation(z, ACTIVATION, act_param)
        y_offs = _offsets(n, c, s, W, stride_y_n, stride_y_c, stride_y_s, stride_y_h, SPLIT_S, S_ALIGN)
        tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        if not PREFETCH:
            x_next = _x_tile(
                x_ptr, next_tile, c, c_mask, n_tiles_s, N, S, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h,
                BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
            )  # fmt: skip
        x = x_next


@triton.jit
def _bn_act_fwd_stats_kernel(
    x_ptr, count_ptr, part_mean_ptr, part_m2_ptr, counter_ptr, mean_ptr, rstd_ptr, running_mean_ptr,
    running_var_ptr, N, C, S, W, n_tiles, n_tiles_s, tiles_per_program, eps, momentum,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h,
    HAS_RUNNING: tl.constexpr, FINALIZE: tl.constexpr, BLOCK_SIZE_P: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Batch statistics of x [N, C, S] in one launch. Grid (P, cdiv(C, BLOCK_SIZE_C)).

    Program (p, c-block) reduces tiles [p * tiles_per_program, (p + 1) * tiles_per_program) into a partial:
    count[p, c] (elements per channel), part_mean[p, c] (relative to the channel's pivot x[0, c, 0]) and
    part_m2[p, c] = sum (x - mean of the partial)^2. The last
    program of a channel block to arrive (``counter_ptr[c-block]`` counts arrivals) merges the P partials in
    index order (:func:`_merge_partials`; the same fixed order whichever program is last, so the result is
    bitwise reproducible) and resets the counter to 0 (so a CUDA graph replays it). FINALIZE: it writes
    mean[C] and rstd[C] = 1 / sqrt(M2 / n + eps) and updates running_mean/running_var[C] (exactly once per
    launch: one last program per channel block); otherwise mean into ``mean_ptr`` and M2 into ``rstd_ptr``
    (local statistics to merge across ranks).

    Why an arrival counter rather than a second launch or a one-shot tree in the consumer: the merge costs one
    program per channel block P * BLOCK_SIZE_C * 12 bytes at the kernel's tail, where a tree in every program
    of the elementwise pass would read all partials once per program (as much as the data itself at P ~ 500).
    Ordering: every thread's partial stores, then a CTA barrier, then one thread's acq_rel atomic at GPU scope
    (release is cumulative: it publishes the whole CTA's stores). The program that reads P - 1 acquired every
    earlier release (atomics on one address are totally ordered); its result reaches the other threads through
    shared memory behind a barrier, so their ``.cg`` loads (L2, not L1) of the partials follow the acquire.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = _channel_block(pid_c, BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    tile_begin = pid_p * tiles_per_program
    tile_end = tl.minimum(tile_begin + tiles_per_program, n_tiles)
    pivot = _pivot(x_ptr, c, c_mask, stride_x_c)
    count, mean, m2 = _welford_tiles(
        x_ptr, pivot, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h,
        BLOCK_SIZE_N, BLOCK_SIZE_C, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64, _STAGES,
    )  # fmt: skip
    row = pid_p.to(tl.int64) * C
    tl.store(part_mean_ptr + row + c, mean, mask=c_mask)
    tl.store(part_m2_ptr + row + c, m2, mask=c_mask)
    tl.store(count_ptr + row + c, count, mask=c_mask)
    tl.debug_barrier()  # every thread's stores above precede the release below
    arrived = tl.atomic_add(counter_ptr + pid_c, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        mean, m2, total = _merge_partials(
            count_ptr, part_mean_ptr, part_m2_ptr, c, c_mask, tl.num_programs(0), C, BLOCK_SIZE_P, BLOCK_SIZE_C
        )
        mean += pivot
        if FINALIZE:
            _finalize_stats(
                mean, m2, total, c, c_mask, mean_ptr, rstd_ptr, running_mean_ptr, running_var_ptr, eps, momentum,
                HAS_RUNNING,
            )  # fmt: skip
        else:
            tl.store(mean_ptr + c, mean, mask=c_mask)
            tl.store(rstd_ptr + c, m2, mask=c_mask)
        tl.store(counter_ptr + pid_c, 0)


@triton.jit
def _bn_act_fwd_apply_kernel(
    x_ptr, y_ptr, res_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr,
    N, C, S, W, n_tiles, n_tiles_s, tiles_per_program, eps, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_y_n, stride_y_c, stride_y_s, stride_y_h,
    stride_res_n, stride_res_c, stride_res_s, stride_res_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    RSTD_FROM_VAR: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """y = act((x - mean) * rstd * w + b [+ residual]), elementwise over x, y [N, C, S] (each through its
    strides). Grid (cdiv(n_tiles, tiles_per_program), cdiv(C, BLOCK_SIZE_C)).

    mean, weight, bias are [C]; ``var_ptr`` holds rstd [C] (training, from the combine step) or the running
    variance [C] (eval, RSTD_FROM_VAR: rstd = 1 / sqrt(var + eps)). HAS_RESIDUAL: the residual [N, C, S]
    (``res_ptr``, through its own strides; unused otherwise).
    """
    c = _channel_block(tl.program_id(1), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    tile_begin = tl.program_id(0) * tiles_per_program
    tile_end = tl.minimum(tile_begin + tiles_per_program, n_tiles)
    # The data first, then the per-channel parameters. ptxas still issues each load once its address is ready, so
    # parameter loads (addressed by c alone) may go out first; what the source order buys, read in the sm_90
    # SASS (Triton 3.6): the data loads go out before the parameters' layout conversions (STSM + BAR.SYNC rounds
    # where a thread holds 8 channels, channels_last bf16) and, on (N, C) rows, among the parameter loads rather
    # than after all of them. Plain NCHW keeps them all first (the data address waits on tile // n_tiles_s).
    x = _x_tile(
        x_ptr, tile_begin, c, c_mask, n_tiles_s, N, S, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h,
        BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
    )  # fmt: skip
    mean, rstd = _load_channel_stats(mean_ptr, var_ptr, c, c_mask, eps, RSTD_FROM_VAR)
    w, b = _load_channel_affine(weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT, HAS_BIAS)
    _apply_tiles(
        x, x_ptr, y_ptr, mean, rstd * w, b, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_y_n, stride_y_c, stride_y_s, stride_y_h,
        act_param, ACTIVATION, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64, True,
        HAS_RESIDUAL, res_ptr, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
    )  # fmt: skip


@triton.jit
def _bn_act_fwd_fused_kernel(
    x_ptr, y_ptr, res_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,
    N, C, S, W, n_tiles, n_tiles_s, eps, momentum, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_y_n, stride_y_c, stride_y_s, stride_y_h,
    stride_res_n, stride_res_c, stride_res_s, stride_res_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Whole training forward for one channel block in one launch (small inputs, where launches dominate).

    Grid (cdiv(C, BLOCK_SIZE_C),). Over x [N, C, S]: the batch statistics, written as mean[C] and rstd[C],
    the running statistics updated, and y = act((x - mean) * rstd * w + b [+ residual]) (HAS_RESIDUAL: the
    residual [N, C, S] read once, through its own strides, where y is formed; ``res_ptr`` is unused otherwise).
    RESIDENT (the host guarantees one tile covers all of N and S: n_tiles == 1): x is loaded once and kept in
    registers; mean = pivot + sum(x - pivot) / n and M2 = sum((x - mean)^2), the exact two-pass formulas, then
    y from the same registers, stored once. Otherwise the statistics are taken tile by tile (as in the split
    path's ``_welford_tiles``) and y is a second pass over x (which mostly hits cache).
    """
    c = _channel_block(tl.program_id(0), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    if RESIDENT:
        n, s, n_mask, s_mask, count = _tile_rows(0, 1, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64, S_ALIGN)
        mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
        offs = _offsets(n, c, s, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h, SPLIT_S, S_ALIGN)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # the data first, the parameters after
        pivot = _pivot(x_ptr, c, c_mask, stride_x_c)
        dev = tl.where(mask, x - pivot[None, :, None], 0.0)
        mean_dev = tl.sum(tl.sum(dev, axis=2), axis=0) / count
        centred = tl.where(mask, dev - mean_dev[None, :, None], 0.0)
        m2 = tl.sum(tl.sum(centred * centred, axis=2), axis=0)
        rstd = _finalize_stats(
            pivot + mean_dev, m2, count, c, c_mask, mean_ptr, rstd_ptr, running_mean_ptr, running_var_ptr, eps,
            momentum, HAS_RUNNING,
        )  # fmt: skip
        w, b = _load_channel_affine(weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT, HAS_BIAS)
        z = centred * (rstd * w)[None, :, None] + b[None, :, None]
        z = _load_residual(
            z, res_ptr, n, c, s, mask, W, stride_res_n, stride_res_c, stride_res_s, stride_res_h, SPLIT_S, S_ALIGN,
            HAS_RESIDUAL,
        )  # fmt: skip
        y = _activation(z, ACTIVATION, act_param)
        y_offs = _offsets(n, c, s, W, stride_y_n, stride_y_c, stride_y_s, stride_y_h, SPLIT_S, S_ALIGN)
        tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        pivot = _pivot(x_ptr, c, c_mask, stride_x_c)
        count, mean, m2 = _welford_tiles(
            x_ptr, pivot, c, c_mask, 0, n_tiles, n_tiles_s, N, S, W,
            stride_x_n, stride_x_c, stride_x_s, stride_x_h,
            BLOCK_SIZE_N, BLOCK_SIZE_C, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
            1,  # not pipelined: these programs are latency-bound, and staging costs registers they lack
        )  # fmt: skip
        mean += pivot
        rstd = _finalize_stats(
            mean, m2, count, c, c_mask, mean_ptr, rstd_ptr, running_mean_ptr, running_var_ptr, eps, momentum,
            HAS_RUNNING,
        )  # fmt: skip
        w, b = _load_channel_affine(weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT, HAS_BIAS)
        x = _x_tile(
            x_ptr, 0, c, c_mask, n_tiles_s, N, S, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h,
            BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
        )  # fmt: skip
        _apply_tiles(
            x, x_ptr, y_ptr, mean, rstd * w, b, c, c_mask, 0, n_tiles, n_tiles_s, N, S, W,
            stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_y_n, stride_y_c, stride_y_s, stride_y_h,
            act_param, ACTIVATION, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
            False,  # no prefetch: with it this kernel spilled 24 bytes (Triton 3.6, 2048 fp32 elements, int64 indices)
            HAS_RESIDUAL, res_ptr, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
        )  # fmt: skip
