"""Facts of a compiled kernel for its target, read without a GPU: registers, spills, shared memory, occupancy, and
the SASS summary (load widths, cp.async in the hot loops, barriers inside them).

Everything is read off the cubin Triton built (the binary a GPU would load): ``cuobjdump --dump-resource-usage``
gives registers, shared memory and the local memory a thread uses (on Triton kernels: spills), ``cuobjdump -sass``
the machine code for :mod:`bnbench.kernels._sass`. Both tools ship with Triton. Results are cached by Triton's
hash of the compiled variant, so a table over many cases compiles and reads each distinct variant once.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

from ._sass import SassSummary, summarize
from ._target import Occupancy, Target, occupancy

__all__ = ["CompiledFacts", "bundled_tool", "kernel_facts", "resource_usage"]


@dataclasses.dataclass(frozen=True)
class CompiledFacts:
    kernel: str
    key: str  # Triton's hash of the compiled variant
    target: str
    num_warps: int
    num_stages: int
    registers: int | None  # per thread
    local_bytes: int | None  # per thread: stack frame + local memory, i.e. register spills on Triton kernels
    shared_bytes: int  # per program
    occupancy: Occupancy | None
    sass: SassSummary | None

    @property
    def spills(self) -> bool | None:
        return None if self.local_bytes is None else self.local_bytes > 0


def bundled_tool(name: str) -> str | None:
    """Path of a CUDA binary tool (ptxas, cuobjdump, nvdisasm) shipped with the installed Triton, else on PATH."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def _cuobjdump(cubin: bytes, *flags: str) -> str | None:
    tool = bundled_tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([tool, *flags, path], capture_output=True, text=True, timeout=120)
    return done.stdout if done.returncode == 0 else None


def resource_usage(text: str) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` output -> {"REG": 56, "STACK": 0, "SHARED": 1024, "LOCAL": 0, ...}
    for the (one) function in it."""
    line = next((ln for ln in text.splitlines() if "REG:" in ln), "")
    return {key: int(value) for key, value in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}


#: facts by (Triton's hash of the compiled variant, target name)
_CACHE: dict[tuple[str, str], CompiledFacts] = {}


def kernel_facts(compiled, target: Target) -> CompiledFacts:
    """The facts of one Triton ``CompiledKernel`` (e.g. ``Launch.compiled`` of a recording) for ``target``."""
    md = compiled.metadata
    if md.target.arch != target.arch:
        raise ValueError(f"{md.name} was compiled for sm_{md.target.arch}, not for {target.name}")
    key = (compiled.hash, target.name)
    if key not in _CACHE:
        _CACHE[key] = _read_facts(compiled, target)
    return _CACHE[key]


def _read_facts(compiled, target: Target) -> CompiledFacts:
    md = compiled.metadata
    cubin = compiled.asm["cubin"]
    usage_text = _cuobjdump(cubin, "--dump-resource-usage")
    usage = resource_usage(usage_text) if usage_text else {}
    registers = usage.get("REG")
    local = usage["STACK"] + usage["LOCAL"] if "STACK" in usage and "LOCAL" in usage else None
    sass_text = _cuobjdump(cubin, "-sass")
    num_warps, shared = int(md.num_warps), int(md.shared)
    occ = None if registers is None else occupancy(target, registers=registers, num_warps=num_warps,
                                                     shared_bytes=shared)  # fmt: skip
    return CompiledFacts(
        kernel=md.name, key=compiled.hash, target=target.name, num_warps=num_warps,
        num_stages=int(getattr(md, "num_stages", 0)), registers=registers, local_bytes=local, shared_bytes=shared,
        occupancy=occ, sass=summarize(sass_text) if sass_text else None,
    )  # fmt: skip
