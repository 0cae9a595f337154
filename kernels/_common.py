"""Triton helpers shared by the forward and backward kernels: tile addressing, the activation dispatcher, its
gradient and (for the invertible activations) its inverse.

Every kernel sees its tensors as ``[N, C, S]`` through strides (``S`` = H*W, 1 for 2-D input). A *tile* is a
``[BLOCK_SIZE_N, BLOCK_SIZE_C, BLOCK_SIZE_S]`` block; the reduction axes (N and S) are walked tile by tile,
numbered ``tile = tile_n * n_tiles_s + tile_s``. When H and W cannot be merged into one stride (a strided view
of a 4-D tensor), ``SPLIT_S`` is set and ``s`` is split into ``(s // W, s % W)`` with strides ``stride_h``
and ``stride_s`` (which then is the W stride).
"""

import triton
import triton.language as tl

#: software-pipelining depth of the reduction loops (``tl.range(..., num_stages=_STAGES)``: cp.async copies of the
#: next tiles are in flight while one is reduced)
_STAGES = tl.constexpr(3)


@triton.jit
def _index(value, INDEX_64: tl.constexpr):
    """Index arithmetic in int64 only when some tensor spans 2**30 elements or more (the host decides)."""
    if INDEX_64:
        return tl.cast(value, tl.int64)  # tl.cast also takes the Python ints Triton makes of arguments equal to 1
    else:
        return value


@triton.jit
def _channel_block(pid, BLOCK_SIZE_C: tl.constexpr, INDEX_64: tl.constexpr = True):
    """Channel indices of program ``pid`` along the channel grid axis."""
    return _index(pid, INDEX_64) * BLOCK_SIZE_C + tl.arange(0, BLOCK_SIZE_C)


@triton.jit
def _aligned(value, ALIGN: tl.constexpr):
    """``value``, which the host guarantees is a multiple of ALIGN, written so the compiler knows it: the product
    by the constant ALIGN carries that divisibility into the offsets and the S mask, so runs along S vectorise
    (128-bit loads of fp32 at S % 4 == 0) where Triton's own specialisation marks only multiples of 16."""
    if ALIGN > 1:
        return (value // ALIGN) * ALIGN
    else:
        return value


@triton.jit
def _tile_rows(
    tile, n_tiles_s, N, S, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_S: tl.constexpr, INDEX_64: tl.constexpr = True,
    S_ALIGN: tl.constexpr = 1,
):  # fmt: skip
    """Row indices of one tile along N and S, their masks, and the number of valid (n, s) pairs. S_ALIGN: a power
    of two the host guarantees divides S (:func:`_aligned`)."""
    S = _aligned(S, S_ALIGN)
    tile_n = tile // n_tiles_s
    tile_s = tile - tile_n * n_tiles_s
    n0 = _index(tile_n, INDEX_64) * BLOCK_SIZE_N
    s0 = _index(tile_s, INDEX_64) * BLOCK_SIZE_S
    n = n0 + tl.arange(0, BLOCK_SIZE_N)
    s = s0 + tl.arange(0, BLOCK_SIZE_S)
    valid_n = tl.minimum(N - n0, BLOCK_SIZE_N)
    valid_s = tl.minimum(S - s0, BLOCK_SIZE_S)
    return n, s, n < N, s < S, (valid_n * valid_s).to(tl.float32)


@triton.jit
def _next_tile(tile, tile_end, n_tiles_s, N, BLOCK_SIZE_N: tl.constexpr):
    """The tile after ``tile`` when it is below ``tile_end``, else the tile just past the last of the tensor,
    whose rows all lie at n >= N (:func:`_tile_rows` masks it whole): a prefetch past a program's own tiles
    reads nothing."""
    return tl.where(tile + 1 < tile_end, tile + 1, tl.cdiv(N, BLOCK_SIZE_N) * n_tiles_s)


@triton.jit
def _offsets(n, c, s, W, stride_n, stride_c, stride_s, stride_h, SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr = 1):
    """Element offsets of a [BLOCK_SIZE_N, BLOCK_SIZE_C, BLOCK_SIZE_S] tile (in the indices' integer type).
    S_ALIGN: a power of two the host guarantees divides stride_n and stride_c (:func:`_aligned`; 1 with SPLIT_S)."""
    stride_n = _aligned(stride_n, S_ALIGN)
    stride_c = _aligned(stride_c, S_ALIGN)
    if SPLIT_S:
        h = s // W
        s_off = h * stride_h + (s - h * W) * stride_s
    else:
        s_off = s * stride_s
    return n[:, None, None] * stride_n + c[None, :, None] * stride_c + s_off[None, None, :]


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # Sign-symmetric form: exp never overflows, tanh(+-inf) = +-1.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0.0, -t, t)


# Literal constants below (Triton's interpreter and compiler agree on literals): 0.7071067811865476 = 1/sqrt(2),
# 0.3989422804014327 = 1/sqrt(2*pi), 0.7978845608028654 = sqrt(2/pi), 0.044715 = the tanh-GELU cubic coefficient.


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr, act_param):
    """act(z) in fp32, selected by the constexpr ACTIVATION (an ``Activation`` value)."""
    if ACTIVATION == "identity":
        return z
    elif ACTIVATION == "relu":
        return tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as in PyTorch (a plain max would return 0)
    elif ACTIVATION == "leaky_relu":
        return tl.where(z > 0.0, z, z * act_param)
    elif ACTIVATION == "sigmoid":
        return _sigmoid(z)
    elif ACTIVATION == "tanh":
        return _tanh(z)
    elif ACTIVATION == "gelu":
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    else:
        tl.static_assert(ACTIVATION == "silu", "unknown ACTIVATION")
        return z * _sigmoid(z)


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr, act_param):
    """d act(z) / dz in fp32 (PyTorch's conventions at the kinks: relu'(0) = 0, leaky_relu'(0) = slope)."""
    if ACTIVATION == "identity":
        return tl.full(z.shape, 1.0, tl.float32)
    elif ACTIVATION == "relu":
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == "leaky_relu":
        return tl.where(z > 0.0, 1.0, act_param)
    elif ACTIVATION == "sigmoid":
        sig = _sigmoid(z)
        return sig * (1.0 - sig)
    elif ACTIVATION == "tanh":
        t = _tanh(z)
        return 1.0 - t * t
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == "gelu_tanh":
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    else:
        tl.static_assert(ACTIVATION == "silu", "unknown ACTIVATION")
        sig = _sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _activation_inverse(y, ACTIVATION: tl.constexpr, act_param):
    """z = act^-1(y) in fp32, for the invertible activations only: identity, and leaky_relu with a slope > 0
    (the host checks the slope)."""
    if ACTIVATION == "identity":
        return y
    else:
        tl.static_assert(ACTIVATION == "leaky_relu", "only identity and leaky_relu are invertible")
        return tl.where(y > 0.0, y, y / act_param)


@triton.jit
def _load_channel_affine(weight_ptr, bias_ptr, c, c_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 weight and bias of a channel block (1 and 0 where the layer has none)."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    else:
        w = tl.full(c.shape, 1.0, tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(c.shape, tl.float32)
    return w, b


@triton.jit
def _load_channel_rstd(var_ptr, c, c_mask, eps, RSTD_FROM_VAR: tl.constexpr):
    """fp32 rstd of a channel block; ``var_ptr`` holds rstd, or the variance when RSTD_FROM_VAR."""
    if RSTD_FROM_VAR:
        var = tl.load(var_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
        return 1.0 / tl.sqrt_rn(var + eps)
    else:
        return tl.load(var_ptr + c, mask=c_mask, other=1.0).to(tl.float32)


@triton.jit
def _load_channel_stats(mean_ptr, var_ptr, c, c_mask, eps, RSTD_FROM_VAR: tl.constexpr):
    """fp32 mean and rstd of a channel block; ``var_ptr`` holds rstd, or the variance when RSTD_FROM_VAR."""
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    return mean, _load_channel_rstd(var_ptr, c, c_mask, eps, RSTD_FROM_VAR)


@triton.jit
def _residual_tile(
    res_ptr, n, c, s, mask, W, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
    SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr,
):  # fmt: skip
    """One tile of the residual (through its own strides, in its dtype, 0 off the mask). Called under a
    HAS_RESIDUAL constexpr only, so that a kernel without one loads nothing and compiles as it did before it took
    a residual argument."""
    offs = _offsets(n, c, s, W, stride_res_n, stride_res_c, stride_res_s, stride_res_h, SPLIT_S, S_ALIGN)
    return tl.load(res_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _load_residual(
    z, res_ptr, n, c, s, mask, W, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
    SPLIT_S: tl.constexpr, S_ALIGN: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """z + residual over one tile (:func:`_residual_tile`, added in fp32), or z unchanged without one."""
    if HAS_RESIDUAL:
        res = _residual_tile(res_ptr, n, c, s, mask, W, stride_res_n, stride_res_c, stride_res_s, stride_res_h,
                             SPLIT_S, S_ALIGN)  # fmt: skip
        return z + res.to(tl.float32)
    else:
        return z


@triton.jit
def _store_tile(
    ptr, value, n, c, s, mask, W, stride_n, stride_c, stride_s, stride_h, SPLIT_S: tl.constexpr,
    S_ALIGN: tl.constexpr,
):  # fmt: skip
    """Store an fp32 tile into ``ptr`` (through its strides), rounded to its dtype."""
    offs = _offsets(n, c, s, W, stride_n, stride_c, stride_s, stride_h, SPLIT_S, S_ALIGN)
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)
