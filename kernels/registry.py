"""Every Triton kernel of bnbench, listed once.

Read by :mod:`.aot` (compile checks and their constexpr defaults), by the profiler (which kernels are bnbench's,
and the bytes each streams) and by the every-kernel compile test. A new kernel is added here, nowhere else.

Per kernel:
  - ``defaults``: a valid value for every constexpr it takes, so that a compile check can build it unasked;
  - ``variants``: the constexpr overrides a compile check must cover besides the defaults (e.g. the backward
    from the saved output, which needs an invertible activation);
  - ``tensor_passes``: full-tensor reads plus writes (of x, y, dy, dx) when it streams, or None for a kernel
    that touches only per-channel partials. Without a residual: with one, the forward kernels read it once more
    and the backward kernels read it once more wherever they rebuild z, and write its gradient once (where dx is
    written).
"""

from __future__ import annotations

import dataclasses

from ._backward import (
    _bn_act_bwd_dx_kernel,
    _bn_act_bwd_fused_kernel,
    _bn_act_bwd_reduce_kernel,
)
from ._forward import (
    _bn_act_fwd_apply_kernel,
    _bn_act_fwd_fused_kernel,
    _bn_act_fwd_stats_kernel,
)
from ._gemm import _gemm_bn_act_eval_kernel, _gemm_bn_stats_kernel, _gemm_partials_merge_kernel

__all__ = ["KERNELS", "KernelSpec", "kernel_spec"]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel: its JIT function and what a compile check and the profiler need to know about it."""

    fn: object  # triton.JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    phase: str  # "forward", "backward", or "matmul" (kernels/_gemm.py: compile-checked by tests/test_gemm_compile.py)
    tensor_passes: int | None
    defaults: dict[str, object]
    variants: dict[str, dict[str, object]] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.fn.__name__


#: the tile and addressing constexprs every data kernel takes
_TILES = {"BLOCK_SIZE_N": 1, "BLOCK_SIZE_C": 16, "BLOCK_SIZE_S": 128, "SPLIT_S": False, "S_ALIGN": 1, "INDEX_64": True}
#: the activation and affine switches of the kernels that normalise
_AFFINE = {"ACTIVATION": "relu", "HAS_WEIGHT": True, "HAS_BIAS": True}
#: the backward from the saved output y; it inverts the activation, so it needs an invertible one
_FROM_OUTPUT = {"from_output": {"SAVED_OUTPUT": True, "ACTIVATION": "leaky_relu"}}
#: the small path's register-resident form (one tile covers N*S: x and dy are loaded once)
_RESIDENT = {"resident": {"RESIDENT": True}}
#: act(BN(x) + residual): the residual read where z is formed (and its gradient written where dx is)
_RESIDUAL = {"residual": {"HAS_RESIDUAL": True}}
#: the same in the register-resident form (the residual's tile is live beside x's and dy's)
_RESIDENT_RESIDUAL = {"resident_residual": {"RESIDENT": True, "HAS_RESIDUAL": True}}
_BACKWARD = {**_TILES, **_AFFINE, "SAVED_OUTPUT": False}
#: the kernels that take a residual: off by default (they compile as they did before they took one)
_NO_RESIDUAL = {"HAS_RESIDUAL": False}
#: the split reductions' merge (by the last program of each channel block) holds BLOCK_SIZE_P partials per step
_MERGE = {"BLOCK_SIZE_P": 16}
#: the matmul kernels' tiles: what the GEMM launcher picks for large bf16 inputs on Hopper
_MATMUL = {
    "SPLIT_ROWS": False,
    "INPUT_PRECISION": "ieee",
    "UPCAST": False,
    "BLOCK_SIZE_M": 128,
    "BLOCK_SIZE_N": 128,
    "BLOCK_SIZE_K": 64,
    "GROUP_SIZE_M": 8,
}

# The fused kernels read x (and dy) twice when they loop over tiles; on the small inputs they are chosen for the
# second read mostly hits cache (their RESIDENT form reads once: 2 and 3 passes). Passes assume training (in eval
# the backward reduce kernel also writes dx and no dx kernel runs).
KERNELS: tuple[KernelSpec, ...] = (
    KernelSpec(_bn_act_fwd_stats_kernel, "forward", 1, {**_TILES, **_MERGE, "HAS_RUNNING": True, "FINALIZE": True}),
    KernelSpec(
        _bn_act_fwd_apply_kernel, "forward", 2, {**_TILES, **_AFFINE, **_NO_RESIDUAL, "RSTD_FROM_VAR": False}, _RESIDUAL
    ),
    KernelSpec(
        _bn_act_fwd_fused_kernel,
        "forward",
        3,
        {**_TILES, **_AFFINE, **_NO_RESIDUAL, "HAS_RUNNING": True, "RESIDENT": False},
        {**_RESIDENT, **_RESIDUAL, **_RESIDENT_RESIDUAL},
    ),
    KernelSpec(
        _bn_act_bwd_reduce_kernel,
        "backward",
        2,
        {**_BACKWARD, **_MERGE, **_NO_RESIDUAL, "TRAINING": True},
        {**_FROM_OUTPUT, **_RESIDUAL},
    ),
    KernelSpec(_bn_act_bwd_dx_kernel, "backward", 3, {**_BACKWARD, **_NO_RESIDUAL}, {**_FROM_OUTPUT, **_RESIDUAL}),
    KernelSpec(
        _bn_act_bwd_fused_kernel,
        "backward",
        5,
        {**_BACKWARD, **_NO_RESIDUAL, "TRAINING": True, "RESIDENT": False},
        {**_FROM_OUTPUT, **_RESIDENT, **_RESIDUAL, **_RESIDENT_RESIDUAL},
    ),
    # Linear / 1x1-conv + BatchNorm: the matmul's bytes are counted by bench.bytes_model.matmul_bn_act_bytes
    KernelSpec(_gemm_bn_stats_kernel, "matmul", None, {**_MATMUL, "STATS": True}),
    KernelSpec(_gemm_bn_act_eval_kernel, "matmul", None, {**_MATMUL, **_AFFINE}),
    KernelSpec(_gemm_partials_merge_kernel, "matmul", None, {"BLOCK_SIZE_R": 16, "BLOCK_SIZE_C": 256}),
)


def kernel_spec(name: str) -> KernelSpec:
    """The registry entry of kernel ``name``; a ValueError listing the kernels when there is none."""
    for spec in KERNELS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown kernel {name!r}; kernels: {', '.join(sorted(s.name for s in KERNELS))}")
