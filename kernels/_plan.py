"""Host-side planning: view tensors as [N, C, S] through strides, and pick tiles and the split of the reduction.

No tensor is ever copied: (N, C), (N, C, L), NCHW, channels_last and strided views are all described by a
:class:`Geometry` plus one :class:`Strides` per tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ._driver import recording_target

__all__ = [
    "Geometry",
    "KernelConfig",
    "Strides",
    "cdiv",
    "default_config",
    "elementwise_grid",
    "geometry_of",
    "next_pow2",
]


@dataclasses.dataclass(frozen=True)
class Strides:
    """Element strides of one tensor seen as [N, C, S]; ``h`` is used only when the geometry splits S."""

    n: int
    c: int
    s: int
    h: int

    def args(self) -> tuple[int, int, int, int]:
        return self.n, self.c, self.s, self.h


#: element offsets at or past this need int64 index arithmetic (a margin below 2**31 covers masked lanes)
_INT32_SAFE_EXTENT = 2**30


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Sizes of the [N, C, S] view. ``split_s``: S = H*W must be addressed as (s // W, s % W).
    ``index_64``: some tensor spans 2**30 elements or more, so offsets are computed in int64."""

    N: int
    C: int
    S: int
    W: int
    split_s: bool
    index_64: bool = False
    #: a power of two (<= 16) dividing S and every tensor's N and C strides, where S has unit stride in every tensor
    #: (1 otherwise): the kernels tell the compiler (constexpr ``S_ALIGN``), so runs along S vectorise
    align: int = 1
    #: NCHW with a small S: (n, s) addressed as one row axis of N*S rows (N = 1, S = N*S, W = the image's S, through
    #: the SPLIT_S addressing: row r is (n, s) = (r // W, r % W)), so padding is per tile, not per image
    flat_rows: bool = False

    @property
    def rows(self) -> int:
        """Elements per channel: the reduction size M = N*S."""
        return self.N * self.S


def _nchw(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sizes and strides of a tensor as (N, C, H, W)."""
    if len(shape) == 2:
        return (shape[0], shape[1], 1, 1), (stride[0], stride[1], 0, 0)
    if len(shape) == 3:
        return (shape[0], shape[1], 1, shape[2]), (stride[0], stride[1], 0, stride[2])
    if len(shape) == 4:
        return shape, stride
    raise ValueError(f"expected a 2-D, 3-D or 4-D tensor, got {len(shape)}-D with shape {shape}")


def geometry_of(*tensors: torch.Tensor) -> tuple[Geometry, tuple[Strides, ...]]:
    """The common [N, C, S] view of same-shaped tensors (x, y, dy, dx), each with its own strides.

    H and W merge into one S axis when every tensor allows it (stride_h == W * stride_w); N and S then merge
    into one row axis when every tensor allows it (stride_n == S * stride_s, as in channels_last), so the
    kernels see the longest runs the memory layout offers. Cached by layout: it runs on every launch.
    """
    return _geometry(tuple((tuple(t.shape), t.stride()) for t in tensors))


@functools.lru_cache(maxsize=4096)
def _geometry(layouts: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]) -> tuple[Geometry, tuple[Strides, ...]]:
    shape0 = layouts[0][0]
    for shape, _ in layouts[1:]:
        if shape != shape0:
            raise ValueError(f"shape mismatch: {shape} vs {shape0}")
    (N, C, H, W), _ = _nchw(*layouts[0])
    S = H * W
    raw = [_nchw(shape, stride)[1] for shape, stride in layouts]
    extent = max(sum((n - 1) * abs(st) for n, st in zip(shape, stride, strict=True)) for shape, stride in layouts)
    index_64 = extent + 1 >= _INT32_SAFE_EXTENT

    def merged_s_stride(sh: int, sw: int) -> int | None:
        if W == 1:
            return sh if H > 1 else 1
        if H == 1 or sh == W * sw:
            return sw
        return None

    s_strides = [merged_s_stride(sh, sw) for (_, _, sh, sw) in raw]
    if any(s is None for s in s_strides):
        geom = Geometry(N, C, S, W, split_s=True, index_64=index_64)
        return geom, tuple(Strides(sn, sc, sw, sh) for (sn, sc, sh, sw) in raw)

    strides = [Strides(sn, sc, ss, 0) for (sn, sc, _, _), ss in zip(raw, s_strides, strict=True)]
    if S > 1 and all(st.n == S * st.s for st in strides):
        # Rows merge: (n, s) is one axis of stride s. S becomes 1 (its stride is then irrelevant).
        merged = Geometry(N * S, C, 1, 1, split_s=False, index_64=index_64)
        return merged, tuple(Strides(st.s, st.c, 1, 0) for st in strides)
    if N > 1 and S > 1 and strides[0].s == 1 and _image_waste_too_high(S):
        # NCHW-like with a small S (7x7 = 49): power-of-two tiles along S would pad every image (49 -> 64: 30%).
        # Address (n, s) as one row axis r = n * S + s instead, through the split-S arithmetic (h = n, stride_h =
        # stride_n): a tile of rows spans images, contiguous within each, and pads only the last tile.
        flat = Geometry(1, C, N * S, S, split_s=True, index_64=index_64, flat_rows=True)
        return flat, tuple(Strides(0, st.c, st.s, st.n) for st in strides)
    align = 1
    if S > 1 and all(st.s == 1 for st in strides):
        common = math.gcd(S, *(st.n for st in strides), *(st.c for st in strides))
        align = min(16, common & -common)  # S > 1: common >= 1
    return Geometry(N, C, S, W if S > 1 else 1, split_s=False, index_64=index_64, align=align), tuple(strides)


def _image_waste_too_high(S: int) -> bool:
    """Whether the best tile along S (:func:`_low_waste_block`) still pads an image of S elements by over 1/8."""
    block = _low_waste_block(S, 1024)
    return cdiv(S, block) * block > S * 9 // 8


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch settings. ``num_partials`` = 1 selects the single-launch fused kernels (small inputs)."""

    block_size_n: int
    block_size_c: int
    block_size_s: int
    num_partials: int
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_size_n", "block_size_c", "block_size_s", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 1, got {value}")
        if self.num_partials < 1:
            raise ValueError(f"KernelConfig.num_partials must be >= 1, got {self.num_partials}")

    def tiles(self, geom: Geometry) -> tuple[int, int]:
        """(number of tiles along the reduction axes, tiles along S)."""
        n_tiles_s = cdiv(geom.S, self.block_size_s)
        return cdiv(geom.N, self.block_size_n) * n_tiles_s, n_tiles_s

    def partials(self, geom: Geometry) -> tuple[int, int]:
        """(programs along the reduction, tiles per program) of a split reduction: ``num_partials`` at most,
        every program with at least one tile."""
        n_tiles, _ = self.tiles(geom)
        tiles_per_program = cdiv(n_tiles, min(self.num_partials, n_tiles))
        return cdiv(n_tiles, tiles_per_program), tiles_per_program

    def describe(self) -> str:
        path = "fused" if self.num_partials == 1 else f"split{self.num_partials}"
        return f"{path}:bn{self.block_size_n}xbc{self.block_size_c}xbs{self.block_size_s}:w{self.num_warps}"


def cdiv(a: int, b: int) -> int:
    """Ceiling division in plain Python (``triton.cdiv`` costs microseconds per call on the launch path)."""
    return -(-a // b)


def _pow2_at_most(value: int, cap: int) -> int:
    """The largest power of two <= min(value, cap) (at least 1)."""
    value = max(1, min(value, cap))
    return 1 << (value.bit_length() - 1)


def next_pow2(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def _low_waste_block(size: int, cap: int) -> int:
    """Largest power-of-two block <= cap whose padding wastes at most 1/8 of ``size`` (>= 16 if size is)."""
    block = min(next_pow2(size), cap)
    while block > 16 and cdiv(size, block) * block > size * 9 // 8:
        block //= 2
    return block


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device)
    target = recording_target()  # launches recorded for a GPU target (bnbench inspect): plan for its SMs
    return 4 if target is None else target.sms  # the interpreter: any small number (programs run one at a time)


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


#: CUDA's limit on grid axes 1 and 2 (the launchers put channel blocks on axis 1), and on axis 0
_MAX_GRID_Y = 65535
_MAX_GRID_X = 2**31 - 1
#: elements per channel block and tile that keep a program's working set in registers
_TILE_ELEMENTS = {1: 2048, 2: 2048, 4: 2048, 8: 1024}
#: the fused single-launch kernels are used while one program's share of the input stays this small
_FUSED_MAX_BYTES_PER_PROGRAM = 64 << 10


#: padded elements per program of the register-resident small path: 16 per thread at 8 warps, which keeps the
#: backward (x, dy, x_hat, dz of every element live at once) under 128 registers without spills
_RESIDENT_MAX_ELEMENTS = 4096
#: the narrowest run of channels a resident program reads where C has unit stride
_RESIDENT_MIN_RUN_BYTES = 32


def _num_warps(elements: int) -> int:
    """Warps for a tile: 8 elements per thread at most up to 8 warps (fp32 per-lane state stays in registers)."""
    return 8 if elements >= 2048 else 4 if elements >= 1024 else 2 if elements >= 256 else 1


def _resident_config(geom: Geometry, x_strides: Strides, element_size: int, sms: int) -> KernelConfig | None:
    """The register-resident plan (one tile holds a channel block's whole N*S; one serial step per program), or
    None where even the narrowest channel block would pass the register budget.

    The channel block is the widest that fits the budget, then narrowed (not below a 32-byte run where C has
    unit stride) until the programs cover the SMs, and the warps are chosen for the tile actually launched.
    """
    N, C, S = geom.N, geom.C, geom.S
    block_n, block_s = next_pow2(N), next_pow2(S)
    rows = block_n * block_s
    min_block_c = max(1, _RESIDENT_MIN_RUN_BYTES // element_size) if x_strides.c == 1 else 1
    min_block_c = min(min_block_c, next_pow2(C))
    if rows * min_block_c > _RESIDENT_MAX_ELEMENTS:
        return None
    block_c = _pow2_at_most(_RESIDENT_MAX_ELEMENTS // rows, next_pow2(C))
    while block_c > min_block_c and cdiv(C, block_c) < sms:
        block_c //= 2
    if cdiv(C, block_c) > _MAX_GRID_Y:
        return None
    return KernelConfig(block_n, block_c, block_s, num_partials=1, num_warps=_num_warps(rows * block_c))


def default_config(geom: Geometry, x_strides: Strides, element_size: int, device: torch.device) -> KernelConfig:
    """The launch plan of :func:`_default_config` for the device's SM count, computed once per layout key (it
    runs on every launch; geometry, strides and element size are the key)."""
    return _default_config(geom, x_strides, element_size, _sm_count(device))


@functools.lru_cache(maxsize=4096)
def _default_config(geom: Geometry, x_strides: Strides, element_size: int, sms: int) -> KernelConfig:
    """A launch heuristic for the shape and layout (tuned for 132-SM Hopper parts, sane elsewhere).

    Tiles follow the unit-stride axis so loads coalesce: along C for (N, C) and channels_last, along S for
    NCHW (along the flattened rows of N*S where :func:`geometry_of` flattened a small S, ``Geometry.flat_rows``). The reduction is split over enough programs to fill every SM several times; small inputs use one
    program per channel block and one launch: register-resident (one tile, :func:`_resident_config`) where the
    whole N*S of a narrow channel block fits the register budget, else a loop over tiles.
    """
    target = _TILE_ELEMENTS.get(element_size, 2048)
    N, C, S = geom.N, geom.C, geom.S
    if S > 1 and x_strides.s == 1:  # NCHW-like: runs along S
        block_s = _low_waste_block(S, 1024)
        # flattened rows (7x7): one channel per tile of rows; two channels of 1024 rows at 8 warps spill in the
        # looping fused kernel (bf16, Triton 3.6), and contiguous rows need no second channel to coalesce
        block_c = 1 if geom.flat_rows else _pow2_at_most(target // block_s, min(next_pow2(C), 16))
        block_n = _pow2_at_most(target // (block_s * block_c), next_pow2(N))
    elif x_strides.c == 1 or S == 1:  # runs along C (or rows); tile over rows and C
        if x_strides.c == 1 or x_strides.n != 1:
            block_c = min(next_pow2(C), 128 if element_size >= 4 else 256)
        else:  # (N, C) transposed: N has unit stride
            block_c = _pow2_at_most(target // min(next_pow2(N), 256), next_pow2(C))
        rows_cap = next_pow2(N) if S == 1 else next_pow2(S)
        rows = _pow2_at_most(target // block_c, rows_cap)
        block_n, block_s = (rows, 1) if S == 1 else (1, rows)
    else:  # exotic strides: a square-ish tile
        block_c = min(next_pow2(C), 32)
        block_s = _pow2_at_most(target // block_c, next_pow2(S))
        block_n = 1
    while cdiv(C, block_c) > _MAX_GRID_Y:  # channel blocks ride on grid axis 1, which CUDA caps at 65535
        block_c *= 2
    elems = block_n * block_c * block_s
    # flattened rows: 8 warps (4 rows per thread); at 4 warps the looping fused backward spills (Triton 3.6)
    num_warps = 8 if geom.flat_rows else _num_warps(elems)

    n_tiles = cdiv(N, block_n) * cdiv(S, block_s)
    resident = _resident_config(geom, x_strides, element_size, sms)
    if resident is not None:
        return resident
    # Launch-bound inputs: one program per channel block, one launch. Narrow the channel block (not below a
    # 128-byte row segment where C is the unit-stride axis) to spread the work over more SMs.
    min_block_c = max(1, 128 // element_size) if x_strides.c == 1 else 1
    fused_block_c = block_c
    while fused_block_c > min_block_c and cdiv(C, fused_block_c) < 2 * sms:
        fused_block_c //= 2
    if n_tiles == 1 or geom.rows * fused_block_c * element_size <= _FUSED_MAX_BYTES_PER_PROGRAM:
        fused_warps = _num_warps(block_n * fused_block_c * block_s)  # for the tile launched, not the one planned
        fused_warps = 8 if geom.flat_rows else fused_warps
        return KernelConfig(block_n, fused_block_c, block_s, num_partials=1, num_warps=fused_warps)
    c_blocks = cdiv(C, block_c)
    partials = max(2, min(n_tiles, cdiv(4 * sms, c_blocks)))
    partials = cdiv(n_tiles, cdiv(n_tiles, partials))  # so that every program gets at least one tile
    return KernelConfig(block_n, block_c, block_s, num_partials=partials, num_warps=num_warps)


#: resident threads per SM on sm_80 and later (2048): the most programs of ``32 * num_warps`` threads an SM can hold
_THREADS_PER_SM = 2048
#: full waves of programs an elementwise pass keeps (counted at that most programs per SM)
_ELEMENTWISE_MIN_WAVES = 4
#: most tiles one program of an elementwise pass walks
_ELEMENTWISE_MAX_TILES = 8


def elementwise_grid(cfg: KernelConfig, geom: Geometry, device: torch.device) -> tuple[int, int]:
    """(programs along the tile axis, tiles per program) of an elementwise pass (the forward's apply, the
    backward's dx) on the device's SMs: :func:`_elementwise_grid`."""
    n_tiles, _ = cfg.tiles(geom)
    return _elementwise_grid(n_tiles, cdiv(geom.C, cfg.block_size_c), cfg.num_warps, _sm_count(device))


@functools.lru_cache(maxsize=4096)
def _elementwise_grid(n_tiles: int, c_blocks: int, num_warps: int, sms: int) -> tuple[int, int]:
    """Tiles per program k of an elementwise pass, from this model:

    - A program pays a fixed cost before its first tile streams: the per-channel parameter loads (mean, rstd,
      weight, bias; the sums in the backward), their layout conversions, the tile's index math and the program's
      launch. k tiles per program pay it once; each next tile's load is issued before the tile in hand is
      stored, so a program with k > 1 also keeps a tile in flight of its own.
    - Fewer programs must still fill the machine: the grid keeps at least ``_ELEMENTWISE_MIN_WAVES`` full waves
      of programs, a wave being ``sms * (2048 // (32 * num_warps))`` programs, the most an SM holds by its thread
      limit. The compiled kernels reach at most that occupancy (registers and shared memory can only lower
      it; the property tests hold them at <= 128 registers), so the real waves are at least that many, a grid
      of k > 1 is never below the SM count, and the last partial wave idles at most 1/5 of the pass.
    - k is a power of two, at most ``_ELEMENTWISE_MAX_TILES`` (the fixed cost is amortised to 1/8; more only
      lengthens the tail), and large enough for CUDA's grid limit on axis 0.

    k = 1 wherever k = 2 would leave fewer than those waves (small and mid-sized inputs).
    """
    wave = sms * max(1, _THREADS_PER_SM // (32 * num_warps))
    k = 1
    while k < _ELEMENTWISE_MAX_TILES and cdiv(n_tiles, 2 * k) * c_blocks >= _ELEMENTWISE_MIN_WAVES * wave:
        k *= 2
    k = max(k, cdiv(n_tiles, _MAX_GRID_X))
    return cdiv(n_tiles, k), k
