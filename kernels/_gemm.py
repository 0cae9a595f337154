"""A matmul whose epilogue takes BatchNorm's batch statistics: Z = X @ W^T plus per-tile (count, mean, M2).

``X`` is [M, K] (the input of an ``nn.Linear``, or a 1x1 convolution's input with its rows (n, h, w) addressed
through three strides, so a channels_last tensor or a strided view of one is read in place), ``W`` is [N, K]
(``nn.Linear.weight``, or a 1x1 ``nn.Conv2d.weight`` seen as [C_out, C_in]) and ``Z`` is [M, N]. The
accumulator is fp32 whatever the input dtype; fp16 and bf16 operands run on the tensor cores. fp32 operands
use ``INPUT_PRECISION``: "ieee" (exact fp32 products, what ``nn.Linear`` computes by default, since PyTorch
leaves ``torch.backends.cuda.matmul.allow_tf32`` off) or "tf32" (tensor cores, 10-bit mantissa products).

With ``STATS`` each program also reduces its [BLOCK_SIZE_M, BLOCK_SIZE_N] accumulator tile over its rows,
exactly and in registers (two passes: the tile's mean, then the sum of squared deviations from it), and writes
one partial (count, mean, M2) per column for its row tile. The partials of all row tiles are then merged in a
fixed order by the BatchNorm combine kernel (``_bn_act_fwd_combine_kernel``), so the statistics are
deterministic and never formed as sum/sum-of-squares. The statistics are those of the fp32 accumulator, i.e. of Z
before it is rounded to the output dtype.

``_gemm_partials_merge_kernel`` first merges groups of partials in parallel when there are many (see there).

``_gemm_bn_act_eval_kernel`` is the inference form: with the running statistics known, BatchNorm and the
activation run in the epilogue on the fp32 tile, and only Y is written (X and W read, Y written: 1T of Y).
"""

import triton
import triton.language as tl

from ._common import _activation, _load_channel_affine, _load_channel_stats


@triton.jit
def _tile_ids(pid, M, N, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``: programs walk GROUP_SIZE_M row tiles column by column, so
    the W columns a group reads stay in L2 while its rows are consumed."""
    tiles_m = tl.cdiv(M, BLOCK_SIZE_M)
    tiles_n = tl.cdiv(N, BLOCK_SIZE_N)
    per_group = GROUP_SIZE_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_SIZE_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_SIZE_M)
    within = pid - group * per_group
    return first_m + within % rows_in_group, within // rows_in_group


@triton.jit
def _row_offsets(m, H, W, stride_x_n, stride_x_h, stride_x_w, SPLIT_ROWS: tl.constexpr):
    """int64 element offsets of X's rows ``m``: row m = (n, h, w) with m = (n * H + h) * W + w when SPLIT_ROWS,
    else one row stride (``stride_x_n``)."""
    m = m.to(tl.int64)
    if SPLIT_ROWS:
        hw = m % (H * W)
        h = hw // W
        return (m // (H * W)) * stride_x_n + h * stride_x_h + (hw - h * W) * stride_x_w
    else:
        return m * stride_x_n


@triton.jit
def _matmul_tile(
    x_ptr, w_ptr, M, N, K, H, W, stride_x_n, stride_x_h, stride_x_w, stride_x_k, stride_w_n, stride_w_k,
    SPLIT_ROWS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):  # fmt: skip
    """This program's fp32 [BLOCK_SIZE_M, BLOCK_SIZE_N] tile of X @ W^T, its row and column indices and masks,
    and its row-tile index. Rows past M are exact zeros (their X rows are masked to 0)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_SIZE_M, BLOCK_SIZE_N, GROUP_SIZE_M)
    m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    k = tl.arange(0, BLOCK_SIZE_K)
    m_mask = m < M
    n_mask = n < N
    x_ptrs = x_ptr + _row_offsets(m, H, W, stride_x_n, stride_x_h, stride_x_w, SPLIT_ROWS)[:, None]
    x_ptrs += k[None, :] * stride_x_k
    w_ptrs = w_ptr + n.to(tl.int64)[None, :] * stride_w_n + k[:, None] * stride_w_k
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), tl.float32)
    for k0 in range(0, K, BLOCK_SIZE_K):
        k_mask = k < K - k0
        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:  # exact: bf16 -> fp32, and a product of two bf16 values is exact in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_SIZE_K * stride_x_k
        w_ptrs += BLOCK_SIZE_K * stride_w_k
    return acc, m, n, m_mask, n_mask, pid_m, pid_n


@triton.jit
def _gemm_bn_stats_kernel(
    x_ptr, w_ptr, z_ptr, count_ptr, part_mean_ptr, part_m2_ptr,
    M, N, K, H, W,
    stride_x_n, stride_x_h, stride_x_w, stride_x_k, stride_w_n, stride_w_k, stride_z_m, stride_z_n,
    STATS: tl.constexpr, SPLIT_ROWS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):  # fmt: skip
    """Z[m, n] = sum_k X[m, k] * W[n, k] (fp32 accumulation, stored in Z's dtype). Grid (tiles_m * tiles_n,).

    STATS: program (i, j) also writes, for its rows m in [i*BM, min((i+1)*BM, M)) and columns n of tile j,
    part_mean[i, n] = mean_m Z[m, n] and part_m2[i, n] = sum_m (Z[m, n] - part_mean[i, n])^2 (fp32, [tiles_m, N]),
    and count[i] = the number of those rows (column tile 0 only).

    UPCAST (set by the host under the Triton interpreter for bf16 only, whose ``tl.dot`` multiplies the bf16
    bit patterns as integers): the operands go to fp32 first, which changes no product.
    """
    acc, m, n, m_mask, n_mask, pid_m, pid_n = _matmul_tile(
        x_ptr, w_ptr, M, N, K, H, W, stride_x_n, stride_x_h, stride_x_w, stride_x_k, stride_w_n, stride_w_k,
        SPLIT_ROWS, INPUT_PRECISION, UPCAST, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M,
    )  # fmt: skip
    mask = m_mask[:, None] & n_mask[None, :]
    z_offs = m.to(tl.int64)[:, None] * stride_z_m + n[None, :] * stride_z_n
    tl.store(z_ptr + z_offs, acc.to(z_ptr.dtype.element_ty), mask=mask)
    if STATS:
        count = tl.minimum(M - pid_m * BLOCK_SIZE_M, BLOCK_SIZE_M).to(tl.float32)
        tile_mean = tl.sum(acc, axis=0) / count  # the zero rows past M add nothing
        centred = tl.where(m_mask[:, None], acc - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(centred * centred, axis=0)
        row = pid_m.to(tl.int64) * N
        tl.store(part_mean_ptr + row + n, tile_mean, mask=n_mask)
        tl.store(part_m2_ptr + row + n, tile_m2, mask=n_mask)
        if pid_n == 0:
            tl.store(count_ptr + pid_m, count)


@triton.jit
def _gemm_bn_act_eval_kernel(
    x_ptr, w_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr,
    M, N, K, H, W, eps, act_param,
    stride_x_n, stride_x_h, stride_x_w, stride_x_k, stride_w_n, stride_w_k, stride_y_m, stride_y_n,
    ACTIVATION: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_ROWS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):  # fmt: skip
    """Inference: Y[m, n] = act((Z[m, n] - mean[n]) / sqrt(var[n] + eps) * weight[n] + bias[n]) with Z = X @ W^T
    in fp32 registers and the running statistics ``mean``/``var``: one pass, Z is never written. Grid as
    :func:`_gemm_bn_stats_kernel`'s."""
    acc, m, n, m_mask, n_mask, _, _ = _matmul_tile(
        x_ptr, w_ptr, M, N, K, H, W, stride_x_n, stride_x_h, stride_x_w, stride_x_k, stride_w_n, stride_w_k,
        SPLIT_ROWS, INPUT_PRECISION, UPCAST, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M,
    )  # fmt: skip
    mean, rstd = _load_channel_stats(mean_ptr, var_ptr, n, n_mask, eps, True)
    w, b = _load_channel_affine(weight_ptr, bias_ptr, n, n_mask, HAS_WEIGHT, HAS_BIAS)
    z = (acc - mean[None, :]) * (rstd * w)[None, :] + b[None, :]
    y = _activation(z, ACTIVATION, act_param)
    offs = m.to(tl.int64)[:, None] * stride_y_m + n[None, :] * stride_y_n
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemm_partials_merge_kernel(
    count_ptr, part_mean_ptr, part_m2_ptr, out_count_ptr, out_mean_ptr, out_m2_ptr,
    P, N, rows_per_group,
    BLOCK_SIZE_R: tl.constexpr, BLOCK_SIZE_C: tl.constexpr,
):  # fmt: skip
    """Merge each group of ``rows_per_group`` consecutive partials (count, mean, M2) into one, in a fixed order.
    Grid (G, cdiv(N, BLOCK_SIZE_C)) with G = cdiv(P, rows_per_group) and rows_per_group <= BLOCK_SIZE_R.

    Why not the BatchNorm combine alone: the epilogue writes one partial per 128-row tile, thousands for
    ResNet-50's first stage at batch 256, and that combine walks a channel block's partials one block of 16
    after another; this step first reduces them, all groups in parallel, to a few hundred.

    For group g with rows p: n = sum n_p, mean = K + sum n_p (mean_p - K) / n (K = the group's first mean, so
    nothing cancels), M2 = sum M2_p + n_p (mean_p - mean)^2, as a block over the group (no serial loop).
    Writes out_count[g] (channel block 0), out_mean[g, c], out_m2[g, c].
    """
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_SIZE_C + tl.arange(0, BLOCK_SIZE_C)
    r = tl.arange(0, BLOCK_SIZE_R)
    p = g.to(tl.int64) * rows_per_group + r
    p_mask = (r < rows_per_group) & (p < P)
    c_mask = c < N
    mask = p_mask[:, None] & c_mask[None, :]
    offs = p[:, None] * N + c[None, :]
    cnt = tl.load(count_ptr + p, mask=p_mask, other=0.0)
    mu = tl.load(part_mean_ptr + offs, mask=mask, other=0.0)
    pm2 = tl.load(part_m2_ptr + offs, mask=mask, other=0.0)
    shift = tl.load(part_mean_ptr + g.to(tl.int64) * rows_per_group * N + c, mask=c_mask, other=0.0)
    total = tl.sum(cnt, axis=0)
    mean = shift + tl.sum(tl.where(mask, cnt[:, None] * (mu - shift[None, :]), 0.0), axis=0) / total
    delta = mu - mean[None, :]
    m2 = tl.sum(tl.where(mask, pm2 + cnt[:, None] * delta * delta, 0.0), axis=0)
    tl.store(out_mean_ptr + g.to(tl.int64) * N + c, mean, mask=c_mask)
    tl.store(out_m2_ptr + g.to(tl.int64) * N + c, m2, mask=c_mask)
    if tl.program_id(1) == 0:
        tl.store(out_count_ptr + g, total)
