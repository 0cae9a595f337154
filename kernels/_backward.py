"""Backward kernels: rebuild x_hat and dz from what the forward saved, reduce two per-channel sums, then dx.

What was saved is a constexpr, ``SAVED_OUTPUT``; ``x_ptr`` holds the saved tensor:
  - the input x (default): x_hat = (x - mean) * rstd, z = x_hat * w + b;
  - the output y (memory-saving mode, after in-place activated BatchNorm, Rota Bulo et al. 2018; x can then be
    freed): z = act^-1(y), x_hat = (z - b) / w. The mean is not needed. Only invertible activations qualify
    (identity, leaky_relu with a slope > 0); 1 / w is sign(w) / max(|w|, min_abs_weight), so a zero gamma
    gives finite gradients (x_hat is lost there: see ``bnbench.functional``).
Then, with dz = dy * act'(z): dbias = sum(dz), dweight = sum(dz * x_hat), and in training
  dx = w * rstd * (dz - sum(dz) / M - x_hat * sum(dz * x_hat) / M)   (M = N*S);
in eval (running statistics are constants) dx = w * rstd * dz.
With a residual (constexpr ``HAS_RESIDUAL``; from x only), z = x_hat * w + b + residual: the residual is read again
where z is rebuilt, and its gradient dz is written once, by whichever kernel writes dx (the dx kernel in training,
the reduce kernel in eval, the fused kernel on the small path), in the residual gradient's own strides.

Large inputs (2 launches, 5T of traffic): ``_bn_act_bwd_reduce_kernel`` (grid (P, C blocks), partial sums, which
the last program of each channel block to arrive sums in index order: no float atomics, bitwise reproducible; in
eval it also writes dx and is the only launch), ``_bn_act_bwd_dx_kernel`` (training only). Small inputs: ``_bn_act_bwd_fused_kernel``.
"""

import triton
import triton.language as tl

from ._common import (
    _STAGES,
    _activation_grad,
    _activation_inverse,
    _channel_block,
    _load_channel_affine,
    _load_channel_rstd,
    _load_channel_stats,
    _next_tile,
    _offsets,
    _residual_tile,
    _store_tile,
    _tile_rows,
)


@triton.jit
def _load_backward_params(
    mean_ptr, var_ptr, weight_ptr, bias_ptr, c, c_mask, eps, min_abs_weight,
    RSTD_FROM_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVED_OUTPUT: tl.constexpr,
):  # fmt: skip
    """fp32 (mean, rstd, w, b, 1 / w) of a channel block; ``var_ptr`` holds rstd, or the variance when
    RSTD_FROM_VAR. From x, 1 / w is not needed (1); from y (SAVED_OUTPUT), the mean is not needed (0, not
    loaded) and 1 / w floors |w| at ``min_abs_weight``, keeping its sign."""
    if SAVED_OUTPUT:
        mean = tl.zeros(c.shape, tl.float32)
        rstd = _load_channel_rstd(var_ptr, c, c_mask, eps, RSTD_FROM_VAR)
    else:
        mean, rstd = _load_channel_stats(mean_ptr, var_ptr, c, c_mask, eps, RSTD_FROM_VAR)
    w, b = _load_channel_affine(weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT, HAS_BIAS)
    if SAVED_OUTPUT:
        guarded = tl.maximum(tl.abs(w), min_abs_weight)
        inv_w = tl.where(w < 0.0, -1.0 / guarded, 1.0 / guarded)
    else:
        inv_w = tl.full(c.shape, 1.0, tl.float32)
    return mean, rstd, w, b, inv_w


@triton.jit
def _grad_tile(
    x_ptr, dy_ptr, n, c, s, mask, W, mean, rstd, w, b, inv_w, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    ACTIVATION: tl.constexpr, SAVED_OUTPUT: tl.constexpr, SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr = False, res_ptr=None, stride_res_n=0, stride_res_c=0, stride_res_s=0, stride_res_h=0,
):  # fmt: skip
    """(x_hat, dz) of one tile, in fp32, from x or (SAVED_OUTPUT) from y; both are 0 where the mask is off.
    HAS_RESIDUAL (from x only): z = x_hat * w + b + residual, the residual read through its own strides."""
    x_offs = _offsets(n, c, s, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h, SPLIT_S, S_ALIGN)
    dy_offs = _offsets(n, c, s, W, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h, SPLIT_S, S_ALIGN)
    saved = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
    dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0)  # 0 off the mask, and so is dz
    res = saved  # a stand-in without a residual (_grad_of reads it only with one)
    if HAS_RESIDUAL:
        res = _residual_tile(res_ptr, n, c, s, mask, W, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
                             SPLIT_S, S_ALIGN)  # fmt: skip
    return _grad_of(saved, dy, mask, mean, rstd, w, b, inv_w, act_param, ACTIVATION, SAVED_OUTPUT, res, HAS_RESIDUAL)


@triton.jit
def _grad_of(
    saved, dy, mask, mean, rstd, w, b, inv_w, act_param, ACTIVATION: tl.constexpr, SAVED_OUTPUT: tl.constexpr,
    res=None, HAS_RESIDUAL: tl.constexpr = False,
):  # fmt: skip
    """(x_hat, dz) in fp32 of a loaded tile of x (or y, SAVED_OUTPUT) and dy, each in its own dtype; with a
    residual (HAS_RESIDUAL, from x only) its loaded tile ``res``: z = x_hat * w + b + res."""
    saved = saved.to(tl.float32)
    dy = dy.to(tl.float32)
    if SAVED_OUTPUT:
        tl.static_assert(not HAS_RESIDUAL, "the backward from the output takes no residual")
        z = _activation_inverse(saved, ACTIVATION, act_param)
    else:
        x_hat = tl.where(mask, (saved - mean[None, :, None]) * rstd[None, :, None], 0.0)
        z = x_hat * w[None, :, None] + b[None, :, None]
        if HAS_RESIDUAL:
            z += res.to(tl.float32)
    if ACTIVATION == "identity":
        dz = dy
    else:
        dz = dy * _activation_grad(z, ACTIVATION, act_param)
    if SAVED_OUTPUT:  # after dz, as the compiled code schedules best (fewer registers)
        x_hat = tl.where(mask, (z - b[None, :, None]) * inv_w[None, :, None], 0.0)
    return x_hat, dz


@triton.jit
def _reduce_tiles(
    x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, inv_w, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W,
    act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
    ACTIVATION: tl.constexpr, SAVED_OUTPUT: tl.constexpr, WRITE_DX: tl.constexpr, BLOCK_SIZE_C: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_S: tl.constexpr, SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr, INDEX_64: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr = False, res_ptr=None, stride_res_n=0, stride_res_c=0, stride_res_s=0, stride_res_h=0,
    dres_ptr=None, stride_dres_n=0, stride_dres_c=0, stride_dres_s=0, stride_dres_h=0,
):  # fmt: skip
    """Per-channel sum(dz) and sum(dz * x_hat) over tiles; with WRITE_DX (eval) also dx = w * rstd * dz, and with
    a residual (HAS_RESIDUAL) its gradient dz.

    Each lane of the tile accumulates its own sums across the loop (pipelined when NUM_STAGES > 1:
    ``tl.range``, cp.async) with no cross-lane work inside it; the lanes are summed once after the loop (a tree: also more accurate than adding
    each tile's sum to one running total)."""
    sum_dz = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_C, BLOCK_SIZE_S), tl.float32)
    sum_dz_xhat = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_C, BLOCK_SIZE_S), tl.float32)
    for tile in tl.range(tile_begin, tile_end, num_stages=NUM_STAGES):
        n, s, n_mask, s_mask, _ = _tile_rows(tile, n_tiles_s, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64, S_ALIGN)
        mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
        x_hat, dz = _grad_tile(
            x_ptr, dy_ptr, n, c, s, mask, W, mean, rstd, w, b, inv_w, act_param,
            stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
            ACTIVATION, SAVED_OUTPUT, SPLIT_S, S_ALIGN,
            HAS_RESIDUAL, res_ptr, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
        )  # fmt: skip
        sum_dz += dz
        sum_dz_xhat += dz * x_hat
        if WRITE_DX:
            dx = dz * (w * rstd)[None, :, None]
            dx_offs = _offsets(n, c, s, W, stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h, SPLIT_S, S_ALIGN)
            tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_RESIDUAL:
                _store_tile(dres_ptr, dz, n, c, s, mask, W, stride_dres_n, stride_dres_c, stride_dres_s,
                            stride_dres_h, SPLIT_S, S_ALIGN)  # fmt: skip
    return tl.sum(tl.sum(sum_dz, axis=2), axis=0), tl.sum(tl.sum(sum_dz_xhat, axis=2), axis=0)


@triton.jit
def _dx_inputs(
    x_ptr, dy_ptr, tile, c, c_mask, n_tiles_s, N, S, W,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_S: tl.constexpr, SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr,
    INDEX_64: tl.constexpr,
):  # fmt: skip
    """One tile of x (or y) and of dy, each in its own dtype, 0 off the mask."""
    n, s, n_mask, s_mask, _ = _tile_rows(tile, n_tiles_s, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64, S_ALIGN)
    mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
    x_offs = _offsets(n, c, s, W, stride_x_n, stride_x_c, stride_x_s, stride_x_h, SPLIT_S, S_ALIGN)
    dy_offs = _offsets(n, c, s, W, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h, SPLIT_S, S_ALIGN)
    return tl.load(x_ptr + x_offs, mask=mask, other=0.0), tl.load(dy_ptr + dy_offs, mask=mask, other=0.0)


@triton.jit
def _dx_tiles(
    saved, dy, x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, inv_w, mean_dz, mean_dz_xhat, c, c_mask, tile_begin,
    tile_end, n_tiles_s, N, S, W, act_param,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
    ACTIVATION: tl.constexpr, SAVED_OUTPUT: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr, INDEX_64: tl.constexpr, PREFETCH: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr = False, res_ptr=None, stride_res_n=0, stride_res_c=0, stride_res_s=0, stride_res_h=0,
    dres_ptr=None, stride_dres_n=0, stride_dres_c=0, stride_dres_s=0, stride_dres_h=0,
):  # fmt: skip
    """Training dx = w * rstd * (dz - mean(dz) - x_hat * mean(dz * x_hat)) over tiles [tile_begin, tile_end);
    with a residual (HAS_RESIDUAL) also its gradient dz. ``saved, dy`` are tile ``tile_begin``, loaded by the
    caller (:func:`_dx_inputs`) before the parameters.

    PREFETCH: each next tile's loads are issued before the tile in hand is computed and stored (the compiler
    cannot hoist a load above a store that may alias it), so a program always has a tile in flight while it
    works. Otherwise after the store (one tile live). The residual's tile is the one in hand's, loaded where z
    is formed (in flight with the next tile's loads when prefetching; never a prefetched tile of its own).
    """
    for tile in range(tile_begin, tile_end):
        next_tile = _next_tile(tile, tile_end, n_tiles_s, N, BLOCK_SIZE_N)
        if PREFETCH:
            saved_next, dy_next = _dx_inputs(
                x_ptr, dy_ptr, next_tile, c, c_mask, n_tiles_s, N, S, W,
                stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
                BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
            )  # fmt: skip
        n, s, n_mask, s_mask, _ = _tile_rows(tile, n_tiles_s, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64, S_ALIGN)
        mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
        res = saved  # a stand-in without a residual (_grad_of reads it only with one)
        if HAS_RESIDUAL:
            res = _residual_tile(res_ptr, n, c, s, mask, W, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
                                 SPLIT_S, S_ALIGN)  # fmt: skip
        x_hat, dz = _grad_of(saved, dy, mask, mean, rstd, w, b, inv_w, act_param, ACTIVATION, SAVED_OUTPUT, res,
                             HAS_RESIDUAL)  # fmt: skip
        if HAS_RESIDUAL:
            _store_tile(dres_ptr, dz, n, c, s, mask, W, stride_dres_n, stride_dres_c, stride_dres_s, stride_dres_h,
                        SPLIT_S, S_ALIGN)  # fmt: skip
        dx = (dz - mean_dz[None, :, None] - x_hat * mean_dz_xhat[None, :, None]) * (w * rstd)[None, :, None]
        dx_offs = _offsets(n, c, s, W, stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h, SPLIT_S, S_ALIGN)
        tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if not PREFETCH:
            saved_next, dy_next = _dx_inputs(
                x_ptr, dy_ptr, next_tile, c, c_mask, n_tiles_s, N, S, W,
                stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
                BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
            )  # fmt: skip
        saved, dy = saved_next, dy_next


@triton.jit
def _sum_partials(part_dz_ptr, part_dz_xhat_ptr, c, c_mask, P, C, BLOCK_SIZE_P: tl.constexpr,
                  BLOCK_SIZE_C: tl.constexpr):  # fmt: skip
    """Per-channel sums of P partials part_dz[P, C], part_dz_xhat[P, C] in a fixed order, whichever program runs
    it: lane i of a [BLOCK_SIZE_P, BLOCK_SIZE_C] block adds partials i, i + BLOCK_SIZE_P, ... in index order (no
    cross-lane work in the loop), then one tree over the lanes. ``.cg`` loads: other programs wrote them."""
    sum_dz = tl.zeros((BLOCK_SIZE_P, BLOCK_SIZE_C), tl.float32)
    sum_dz_xhat = tl.zeros((BLOCK_SIZE_P, BLOCK_SIZE_C), tl.float32)
    for p0 in tl.range(0, P, BLOCK_SIZE_P, num_stages=_STAGES):
        p = p0 + tl.arange(0, BLOCK_SIZE_P)
        mask = (p < P)[:, None] & c_mask[None, :]
        offs = p.to(tl.int64)[:, None] * C + c[None, :]
        sum_dz += tl.load(part_dz_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        sum_dz_xhat += tl.load(part_dz_xhat_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return tl.sum(sum_dz, axis=0), tl.sum(sum_dz_xhat, axis=0)


@triton.jit
def _bn_act_bwd_reduce_kernel(
    x_ptr, dy_ptr, dx_ptr, res_ptr, dres_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, part_dz_ptr,
    part_dz_xhat_ptr, counter_ptr, sum_dz_ptr, sum_dz_xhat_ptr, dweight_ptr, dbias_ptr,
    N, C, S, W, n_tiles, n_tiles_s, tiles_per_program, eps, act_param, min_abs_weight,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
    stride_dres_n, stride_dres_c, stride_dres_s, stride_dres_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr,
    SAVED_OUTPUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_SIZE_P: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr, SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """The two per-channel sums of the backward in one launch. Grid (P, cdiv(C, BLOCK_SIZE_C)).

    Program (p, c-block) reduces tiles [p * tiles_per_program, (p + 1) * tiles_per_program) into partials
    part_dz[p, c] = sum(dz) and part_dz_xhat[p, c] = sum(dz * x_hat); in eval it also writes dx = w * rstd * dz.
    The last program of a channel block to arrive (``counter_ptr[c-block]`` counts arrivals; it resets it to 0)
    sums the P partials in index order (:func:`_sum_partials`: bitwise reproducible, no float atomics) and
    writes fp32 sum_dz[C], sum_dz_xhat[C] (for dx) and dweight = sum(dz * x_hat), dbias = sum(dz) in the
    parameters' dtype. The ordering argument is the forward statistics kernel's
    (``_forward._bn_act_fwd_stats_kernel``): stores, CTA barrier, acq_rel atomic; acquire, barrier, ``.cg`` loads.

    x (or y), dy, dx are [N, C, S] through their strides; ``x_ptr`` holds x, or y when SAVED_OUTPUT
    (``mean_ptr`` is then unused). ``var_ptr`` holds the saved rstd [C] (training) or the running variance
    (eval); mean, weight, bias are [C]. HAS_RESIDUAL: z = x_hat * w + b + residual (``res_ptr``, [N, C, S]), and
    in eval the residual's gradient dz is written into ``dres_ptr`` with dx (in training the dx kernel writes it);
    both are unused otherwise.
    """
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = _channel_block(pid_c, BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    mean, rstd, w, b, inv_w = _load_backward_params(
        mean_ptr, var_ptr, weight_ptr, bias_ptr, c, c_mask, eps, min_abs_weight,
        not TRAINING, HAS_WEIGHT, HAS_BIAS, SAVED_OUTPUT,
    )  # fmt: skip
    tile_begin = pid_p * tiles_per_program
    tile_end = tl.minimum(tile_begin + tiles_per_program, n_tiles)
    sum_dz, sum_dz_xhat = _reduce_tiles(
        x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, inv_w, c, c_mask, tile_begin, tile_end, n_tiles_s, N, S, W,
        act_param,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
        stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
        ACTIVATION, SAVED_OUTPUT, not TRAINING, BLOCK_SIZE_C, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
        _STAGES, HAS_RESIDUAL, res_ptr, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
        dres_ptr, stride_dres_n, stride_dres_c, stride_dres_s, stride_dres_h,
    )  # fmt: skip
    row = pid_p.to(tl.int64) * C
    tl.store(part_dz_ptr + row + c, sum_dz, mask=c_mask)
    tl.store(part_dz_xhat_ptr + row + c, sum_dz_xhat, mask=c_mask)
    tl.debug_barrier()  # every thread's stores above precede the release below
    arrived = tl.atomic_add(counter_ptr + pid_c, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        sum_dz, sum_dz_xhat = _sum_partials(
            part_dz_ptr, part_dz_xhat_ptr, c, c_mask, tl.num_programs(0), C, BLOCK_SIZE_P, BLOCK_SIZE_C
        )
        _store_grad_sums(sum_dz, sum_dz_xhat, c, c_mask, sum_dz_ptr, sum_dz_xhat_ptr, dweight_ptr, dbias_ptr,
                         True, HAS_WEIGHT, HAS_BIAS)  # fmt: skip
        tl.store(counter_ptr + pid_c, 0)


@triton.jit
def _store_grad_sums(
    sum_dz, sum_dz_xhat, c, c_mask, sum_dz_ptr, sum_dz_xhat_ptr, dweight_ptr, dbias_ptr,
    STORE_SUMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Write the fp32 sums (STORE_SUMS), dweight = sum(dz * x_hat) and dbias = sum(dz) in the parameters' dtype."""
    if STORE_SUMS:
        tl.store(sum_dz_ptr + c, sum_dz, mask=c_mask)
        tl.store(sum_dz_xhat_ptr + c, sum_dz_xhat, mask=c_mask)
    if HAS_WEIGHT:
        tl.store(dweight_ptr + c, sum_dz_xhat.to(dweight_ptr.dtype.element_ty), mask=c_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + c, sum_dz.to(dbias_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _bn_act_bwd_dx_kernel(
    x_ptr, dy_ptr, dx_ptr, res_ptr, dres_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, sum_dz_ptr,
    sum_dz_xhat_ptr, N, C, S, W, n_tiles, n_tiles_s, tiles_per_program, total, act_param, min_abs_weight,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
    stride_dres_n, stride_dres_c, stride_dres_s, stride_dres_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVED_OUTPUT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr, BLOCK_SIZE_S: tl.constexpr,
    SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Training dx = w * rstd * (dz - sum_dz / total - x_hat * sum_dz_xhat / total), elementwise.
    Grid (cdiv(n_tiles, tiles_per_program), cdiv(C, BLOCK_SIZE_C)).

    sum_dz[C] and sum_dz_xhat[C] are the fp32 sums over ``total`` elements per channel (all ranks together);
    ``x_ptr`` holds x, or y when SAVED_OUTPUT (``mean_ptr`` is then unused); mean, rstd, weight, bias are [C].
    HAS_RESIDUAL: z = x_hat * w + b + residual (``res_ptr``), and the residual's gradient dz is written into
    ``dres_ptr`` (both [N, C, S] through their own strides; unused otherwise).
    """
    c = _channel_block(tl.program_id(1), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    tile_begin = tl.program_id(0) * tiles_per_program
    tile_end = tl.minimum(tile_begin + tiles_per_program, n_tiles)
    # the data first, then the per-channel parameters (_bn_act_fwd_apply_kernel says what the SASS shows)
    saved, dy = _dx_inputs(
        x_ptr, dy_ptr, tile_begin, c, c_mask, n_tiles_s, N, S, W,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
        BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
    )  # fmt: skip
    mean, rstd, w, b, inv_w = _load_backward_params(
        mean_ptr, rstd_ptr, weight_ptr, bias_ptr, c, c_mask, 0.0, min_abs_weight,
        False, HAS_WEIGHT, HAS_BIAS, SAVED_OUTPUT,
    )  # fmt: skip
    inv_total = 1.0 / total
    mean_dz = tl.load(sum_dz_ptr + c, mask=c_mask, other=0.0) * inv_total
    mean_dz_xhat = tl.load(sum_dz_xhat_ptr + c, mask=c_mask, other=0.0) * inv_total
    _dx_tiles(
        saved, dy, x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, inv_w, mean_dz, mean_dz_xhat, c, c_mask, tile_begin,
        tile_end,
        n_tiles_s, N, S, W, act_param,
        stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
        stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
        ACTIVATION, SAVED_OUTPUT, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64, True,
        HAS_RESIDUAL, res_ptr, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
        dres_ptr, stride_dres_n, stride_dres_c, stride_dres_s, stride_dres_h,
    )  # fmt: skip


@triton.jit
def _bn_act_bwd_fused_kernel(
    x_ptr, dy_ptr, dx_ptr, res_ptr, dres_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, dweight_ptr, dbias_ptr,
    N, C, S, W, n_tiles, n_tiles_s, total, eps, act_param, min_abs_weight,
    stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
    stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
    stride_dres_n, stride_dres_c, stride_dres_s, stride_dres_h,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr,
    SAVED_OUTPUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_C: tl.constexpr,
    BLOCK_SIZE_S: tl.constexpr, SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    """Whole backward for one channel block in one launch (small inputs). Grid (cdiv(C, BLOCK_SIZE_C),).

    The two sums over all tiles, dweight[C] = sum(dz * x_hat) and dbias[C] = sum(dz), then dx [N, C, S] (the
    training or eval formula); the other pointers as in ``_bn_act_bwd_reduce_kernel``. RESIDENT (the host
    guarantees n_tiles == 1): x (or y) and dy are loaded once and dx is formed from the same registers;
    otherwise the sums are a pass over the tiles and dx a second one. HAS_RESIDUAL: the residual's gradient dz is
    written where dx is.
    """
    c = _channel_block(tl.program_id(0), BLOCK_SIZE_C, INDEX_64)
    c_mask = c < C
    mean, rstd, w, b, inv_w = _load_backward_params(
        mean_ptr, var_ptr, weight_ptr, bias_ptr, c, c_mask, eps, min_abs_weight,
        not TRAINING, HAS_WEIGHT, HAS_BIAS, SAVED_OUTPUT,
    )  # fmt: skip
    if RESIDENT:
        n, s, n_mask, s_mask, _ = _tile_rows(0, 1, N, S, BLOCK_SIZE_N, BLOCK_SIZE_S, INDEX_64, S_ALIGN)
        mask = n_mask[:, None, None] & c_mask[None, :, None] & s_mask[None, None, :]
        x_hat, dz = _grad_tile(
            x_ptr, dy_ptr, n, c, s, mask, W, mean, rstd, w, b, inv_w, act_param,
            stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
            ACTIVATION, SAVED_OUTPUT, SPLIT_S, S_ALIGN,
            HAS_RESIDUAL, res_ptr, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
        )  # fmt: skip
        if HAS_RESIDUAL:
            _store_tile(dres_ptr, dz, n, c, s, mask, W, stride_dres_n, stride_dres_c, stride_dres_s, stride_dres_h,
                        SPLIT_S, S_ALIGN)  # fmt: skip
        sum_dz = tl.sum(tl.sum(dz, axis=2), axis=0)
        sum_dz_xhat = tl.sum(tl.sum(dz * x_hat, axis=2), axis=0)
        _store_grad_sums(sum_dz, sum_dz_xhat, c, c_mask, dweight_ptr, dweight_ptr, dweight_ptr, dbias_ptr, False,
                         HAS_WEIGHT, HAS_BIAS)  # fmt: skip
        if TRAINING:
            inv_total = 1.0 / total
            dz = dz - (sum_dz * inv_total)[None, :, None] - x_hat * (sum_dz_xhat * inv_total)[None, :, None]
        dx = dz * (w * rstd)[None, :, None]
        dx_offs = _offsets(n, c, s, W, stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h, SPLIT_S, S_ALIGN)
        tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        sum_dz, sum_dz_xhat = _reduce_tiles(
            x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, inv_w, c, c_mask, 0, n_tiles, n_tiles_s, N, S, W, act_param,
            stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s, stride_dy_h,
            stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
            ACTIVATION, SAVED_OUTPUT, not TRAINING, BLOCK_SIZE_C, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
            1,  # not pipelined: these programs are latency-bound, and staging costs registers they lack
            HAS_RESIDUAL, res_ptr, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
            dres_ptr, stride_dres_n, stride_dres_c, stride_dres_s, stride_dres_h,
        )  # fmt: skip
        _store_grad_sums(sum_dz, sum_dz_xhat, c, c_mask, dweight_ptr, dweight_ptr, dweight_ptr, dbias_ptr, False,
                         HAS_WEIGHT, HAS_BIAS)  # fmt: skip
        if TRAINING:
            inv_total = 1.0 / total
            saved, dy = _dx_inputs(
                x_ptr, dy_ptr, 0, c, c_mask, n_tiles_s, N, S, W,
                stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s,
                stride_dy_h, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
            )  # fmt: skip
            _dx_tiles(
                saved, dy, x_ptr, dy_ptr, dx_ptr, mean, rstd, w, b, inv_w, sum_dz * inv_total,
                sum_dz_xhat * inv_total, c, c_mask, 0, n_tiles, n_tiles_s, N, S, W, act_param,
                stride_x_n, stride_x_c, stride_x_s, stride_x_h, stride_dy_n, stride_dy_c, stride_dy_s,
                stride_dy_h, stride_dx_n, stride_dx_c, stride_dx_s, stride_dx_h,
                ACTIVATION, SAVED_OUTPUT, BLOCK_SIZE_N, BLOCK_SIZE_S, SPLIT_S, S_ALIGN, INDEX_64,
                False,  # no prefetch: the fused kernels keep one tile live (the forward spilled with two)
                HAS_RESIDUAL, res_ptr, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
                dres_ptr, stride_dres_n, stride_dres_c, stride_dres_s, stride_dres_h,
            )  # fmt: skip
