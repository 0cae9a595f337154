"""GPU targets the kernels can be compiled for without a GPU, and the occupancy model of one streaming multiprocessor.

A :class:`Target` names a compute capability and the per-SM limits that decide how many programs (CUDA blocks) of
a compiled kernel fit on one SM at a time. The limits are NVIDIA's published figures for the part (CUDA
Programming Guide, "Technical Specifications per Compute Capability"; CUDA Occupancy Calculator):

- registers are allocated per warp in units of ``reg_alloc_unit`` (256) registers, i.e. a thread's count is
  rounded up to a multiple of 8; an SM holds ``regs_per_sm`` (64K) of them;
- shared memory is allocated per block in units of 128 bytes, plus ``reserved_smem_per_block`` (1 KB) the
  system keeps for each block; an SM holds ``smem_per_sm`` bytes in all;
- an SM runs at most ``max_warps_per_sm`` warps and ``max_blocks_per_sm`` blocks.

Blocks per SM = the smallest of the three limits; occupancy = resident warps / ``max_warps_per_sm``. This is a
model (it ignores, e.g., the register file's bank granularity per warp scheduler); figures derived from it are
labelled modelled.
"""

from __future__ import annotations

import dataclasses

__all__ = ["TARGETS", "Occupancy", "Target", "occupancy", "parse_target"]


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # "sm_90"
    arch: int  # 90
    sms: int  # SMs of the reference part (the planner's grid sizing and waves use it)
    part: str  # the reference part
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers per warp are allocated in units of this many
    smem_per_sm: int = 228 * 1024
    max_smem_per_block: int = 227 * 1024
    reserved_smem_per_block: int = 1024
    smem_alloc_unit: int = 128
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    warp_size: int = 32

    def gpu_target(self):
        """Triton's ``GPUTarget`` for this target."""
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, self.warp_size)


#: targets by name; sm_90 is the H100/H200 (132 SMs, as the baselines in MEASURE.md were measured)
TARGETS = {
    "sm_90": Target("sm_90", 90, sms=132, part="H100/H200 SXM"),
    "sm_80": Target("sm_80", 80, sms=108, part="A100", smem_per_sm=164 * 1024, max_smem_per_block=163 * 1024),
}


def parse_target(name: str) -> Target:
    """``"sm_90"`` (or ``"90"``, ``"sm90"``) -> its :class:`Target`; ValueError naming the valid ones."""
    key = str(name).strip().lower().replace("sm", "").lstrip("_")
    target = TARGETS.get(f"sm_{key}")
    if target is None:
        raise ValueError(f"unknown target {name!r}; valid targets are: {', '.join(TARGETS)}")
    return target


@dataclasses.dataclass(frozen=True)
class Occupancy:
    """Programs of one kernel resident on one SM (modelled), and which limit binds."""

    blocks_per_sm: int
    warps_per_sm: int
    fraction: float  # resident warps / max warps per SM
    limited_by: str  # "registers", "shared memory", "warps" or "blocks"


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(target: Target, *, registers: int, num_warps: int, shared_bytes: int) -> Occupancy:
    """Blocks of ``num_warps`` warps using ``registers`` per thread and ``shared_bytes`` of shared memory that fit
    on one SM of ``target`` (see the module docstring for the model)."""
    if num_warps < 1 or registers < 0 or shared_bytes < 0:
        raise ValueError(f"need num_warps >= 1, registers >= 0, shared_bytes >= 0; got {num_warps}, {registers}, "
                         f"{shared_bytes}")  # fmt: skip
    regs_per_warp = _round_up(max(registers, 1) * target.warp_size, target.reg_alloc_unit)
    smem_per_block = _round_up(shared_bytes + target.reserved_smem_per_block, target.smem_alloc_unit)
    limits = {
        "registers": target.regs_per_sm // (regs_per_warp * num_warps),
        "shared memory": target.smem_per_sm // smem_per_block,
        "warps": target.max_warps_per_sm // num_warps,
        "blocks": target.max_blocks_per_sm,
    }
    limited_by = min(limits, key=limits.get)
    blocks = limits[limited_by]
    return Occupancy(blocks, blocks * num_warps, blocks * num_warps / target.max_warps_per_sm, limited_by)
