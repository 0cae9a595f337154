"""The plan of a case as the launchers made it (from a :class:`~bnbench.inspect.record.PassRecord`), with the
compiled facts of every kernel: one row per launch, one summary per pass.

Modelled figures: programs per SM and waves (the target's SM count and the occupancy model of
:mod:`bnbench.kernels._target`), the bytes the kernels' code issues (:mod:`bnbench.kernels._ttir`) beside the
floors a pass must move (:mod:`bnbench.bench.bytes_model`: minimal 2T forward / 3T backward, streaming 3T / 5T),
and times for those bytes at the H200's measured copy bandwidth. None of them is a GPU timing.
"""

from __future__ import annotations

import math

from bnbench.bench.bytes_model import ELEMENT_SIZE, bytes_min
from bnbench.inspect.record import PassRecord

__all__ = ["COPY_GBPS", "STREAMING_TENSOR_PASSES", "launch_bytes", "launch_rows", "pass_summary"]

#: H200 copy bandwidth (read + write) measured in MEASURE.md; modelled times use it
COPY_GBPS = 4270.0
#: full-tensor passes of a streaming implementation (x read twice in training forward; x, dy twice in backward)
STREAMING_TENSOR_PASSES = {"fwd": 3, "bwd": 5, "fwd_bwd": 8, "eval": 2}


def _tiles(constexprs: dict) -> str:
    """``BLOCK_SIZE_N=16, BLOCK_SIZE_C=128`` -> ``"N16xC128"`` (the kernel's tile constexprs, whatever they are)."""
    tiles = [(k.removeprefix("BLOCK_SIZE_"), v) for k, v in constexprs.items() if k.startswith("BLOCK_SIZE_")]
    return "x".join(f"{axis}{value}" for axis, value in tiles)


_PASSES: dict[str, dict[str, int]] = {}  # tensor passes per pointer argument, by compiled variant


def launch_bytes(launch) -> int:
    """Bytes a launch's code issues (modelled from its TTIR: :mod:`bnbench.kernels._ttir`)."""
    from bnbench.kernels._driver import TensorArg
    from bnbench.kernels._ttir import tensor_passes

    if launch.key not in _PASSES:
        names = [name for name, kind in launch.signature.items() if kind != "constexpr"]
        _PASSES[launch.key] = tensor_passes(launch.compiled.asm["ttir"], names)
    args = launch.args
    return sum(n * args[a].nbytes for a, n in _PASSES[launch.key].items() if isinstance(args[a], TensorArg))


def launch_rows(record: PassRecord, target) -> list[dict]:
    """One row per recorded launch: grid, tiles, warps, registers, spills, shared memory, occupancy, waves and
    the SASS facts (load width, cp.async and barriers in the hot loops)."""
    from bnbench.kernels._facts import kernel_facts

    rows = []
    for index, launch in enumerate(record.launches):
        f = kernel_facts(launch.compiled, target)
        occ, sass = f.occupancy, f.sass
        resident = None if occ is None else occ.blocks_per_sm * target.sms
        rows.append({
            **record.case.columns(), "target": target.name, "launch": index, "kernel": launch.kernel,
            "grid": "x".join(map(str, launch.grid)), "programs": launch.programs, "tiles": _tiles(launch.constexprs),
            "num_warps": f.num_warps, "num_stages": f.num_stages, "registers": f.registers,
            "spill_bytes": f.local_bytes, "shared_bytes": f.shared_bytes,
            "blocks_per_sm": None if occ is None else occ.blocks_per_sm,
            "occupancy": None if occ is None else occ.fraction,
            "occupancy_limit": None if occ is None else occ.limited_by,
            "programs_per_sm": launch.programs / target.sms,
            "waves_modelled": None if not resident else math.ceil(launch.programs / resident),
            "bytes_modelled": launch_bytes(launch),
            "loops": None if sass is None else sass.loops,
            "hot_loops": None if sass is None else sass.loops_with_loads,
            "main_load_bits": None if sass is None else sass.main_load_bits,
            "ldgsts_in_loops": None if sass is None else sass.ldgsts_in_loops,
            "bar_sync_in_loops": None if sass is None else sass.bar_sync_in_loops,
            "constexprs": ";".join(f"{k}={v}" for k, v in launch.constexprs.items()),
            "variant": launch.key[:16],
        })  # fmt: skip
    return rows


def _path(record: PassRecord) -> str:
    n = len(record.launches)
    if record.case.pass_ == "eval":
        return "elementwise" if n == 1 else f"{n} launches"
    if record.case.pass_ == "fwd_bwd":
        return f"{n} launches"
    return "fused" if n == 1 else "split"


def _config(record: PassRecord) -> str:
    """The launchers' own description of their plan for the case's input, where they offer one."""
    from bnbench import kernels
    from bnbench.inspect.record import empty_inputs
    from bnbench.kernels._driver import recording

    plan = getattr(kernels, "plan", None)
    if plan is None:
        return ""
    with recording(record.target):  # plan for the target's SMs, as the recorded launches were
        _, cfg = plan(empty_inputs(record.case).x.detach())
    return cfg.describe() if hasattr(cfg, "describe") else str(cfg)


def pass_summary(record: PassRecord, target) -> dict:
    """One row per (case, pass): path, launches (bnbench's and hidden aten kernels), bytes against the floors
    and modelled times at :data:`COPY_GBPS`."""
    case = record.case
    T = case.numel * ELEMENT_SIZE[case.dtype]
    floor = bytes_min(case.pass_, case.numel, case.dtype)
    streaming = STREAMING_TENSOR_PASSES[case.pass_] * T
    aten = sum(record.aten_kernels.values())
    issued = sum(launch_bytes(launch) for launch in record.launches)
    return {
        **case.columns(), "target": target.name, "path": _path(record), "config": _config(record),
        "triton_launches": len(record.launches), "aten_kernel_launches": aten,
        "launches_total": len(record.launches) + aten,
        "aten_kernels": ";".join(f"{k}={v}" for k, v in sorted(record.aten_kernels.items())),
        "kernels": ";".join(launch.kernel for launch in record.launches),
        "bytes_floor": floor, "bytes_streaming": streaming, "bytes_modelled": issued,
        "bytes_vs_floor": issued / floor if floor else math.nan,
        "us_modelled": issued / (COPY_GBPS * 1e3), "us_at_floor_modelled": floor / (COPY_GBPS * 1e3),
    }  # fmt: skip
