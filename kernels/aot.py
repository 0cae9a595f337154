"""Ahead-of-time compilation of the kernels for a GPU target, on any machine (no GPU needed).

The Triton interpreter checks indexing and math but not what only the compiler sees (types, constexpr use,
register pressure). ``compile_kernel`` compiles one kernel through Triton's real pipeline down to a cubin for
``sm_<arch>``, and ``ptxas -v`` (shipped with Triton) reports registers and spills. Which kernels exist, and a
valid value for each of their constexprs, come from :mod:`.registry`. Used by tests/test_kernels_compile.py and
tests/test_gemm_compile.py (the matmul kernels).
Must run in a process where TRITON_INTERPRET is unset (the kernels are then real JIT functions).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

import torch

from .registry import KERNELS as _REGISTRY
from .registry import kernel_spec

__all__ = ["KERNELS", "CompiledKernel", "compile_kernel"]

#: every kernel's JIT function, by name (from :mod:`.registry`)
KERNELS = {spec.name: spec.fn for spec in _REGISTRY}

_FLOAT_SCALARS = {"eps", "momentum", "act_param", "total", "min_abs_weight"}
#: pointers that carry the activation tensor's dtype; every other pointer is fp32 (statistics, parameters)
_DATA_POINTERS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "res_ptr", "dres_ptr", "w_ptr", "z_ptr"}
#: integer pointers (the split reductions' arrival counters)
_INT32_POINTERS = {"counter_ptr"}
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    name: str
    arch: int
    num_warps: int
    registers: int | None
    spill_stores: int | None
    spill_loads: int | None
    shared_bytes: int
    ptx_lines: int
    mma_instructions: int = 0  # tensor-core instructions (mma / wgmma) in the PTX
    #: ``cuobjdump -sass`` of the cubin ("" when no cuobjdump is found): read loop by loop by the property tests
    sass: str = ""


def _ptxas_candidates() -> list[str]:
    """ptxas binaries to try: Triton's own (newest first), then the system's."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    paths = [os.path.join(bundled, name) for name in ("ptxas-blackwell", "ptxas")]
    paths.append(shutil.which("ptxas") or "")
    return [p for p in paths if p and os.path.exists(p)]


def _sass(cubin: bytes) -> str:
    """The SASS listing of a cubin by the cuobjdump Triton ships ("" where there is none)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "-sass", path], capture_output=True, text=True, timeout=120)
    return out.stdout if out.returncode == 0 else ""


def _ptxas_report(ptx: str, arch: int) -> tuple[int | None, int | None, int | None]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v``; Nones when no ptxas accepts the PTX."""
    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas_candidates():
            out = subprocess.run(
                [ptxas, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if out.returncode == 0:
                text = out.stdout + out.stderr
                regs = re.search(r"Used (\d+) registers", text)
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
                if regs and spills:
                    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))
    return None, None, None


def compile_kernel(
    name: str,
    *,
    arch: int = 90,
    dtype: torch.dtype = torch.float32,
    num_warps: int = 4,
    ones: tuple[str, ...] = (),
    variant: str | None = None,
    aligned: bool = True,
    divisible: tuple[str, ...] = (),
    num_stages: int | None = None,
    **constexprs,
) -> CompiledKernel:
    """Compile kernel ``name`` for ``sm_<arch>`` with the given constexprs (the registry's defaults for the rest;
    constexprs this kernel does not take are ignored, so one set can serve every kernel). ``variant`` names one
    of the registry's variants of this kernel (e.g. "from_output"), applied over the defaults.

    Integer arguments are typed int64, as Triton types them for tensors past 2**31 elements. Arguments named in
    ``ones`` are compiled as the constant 1, as Triton specialises any integer argument equal to 1 (S=1,
    unit strides, one tile per program), a path the interpreter never takes.

    ``aligned``: every pointer is 16-byte aligned, as Triton specialises a launch whose tensors start on a
    16-byte boundary (any fresh allocation; not a view with an odd storage offset). ``divisible``: integer
    arguments known to be multiples of 16 (Triton specialises those too, e.g. a stride C = 1024). ``num_stages``:
    the software pipeline's depth (Triton's default when None).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .launchers import interpreter_active

    if interpreter_active():
        raise RuntimeError("compile_kernel needs real JIT kernels: run it where TRITON_INTERPRET is unset")
    spec = kernel_spec(name)
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported by the kernels")
    kernel = spec.fn
    known = {key for s in _REGISTRY for key in s.defaults}
    unknown = sorted(set(constexprs) - known)
    if unknown:
        raise ValueError(f"unknown constexpr(s) {unknown}; the kernels take {sorted(known)}")
    takes = {p.name for p in kernel.params if p.is_constexpr}
    if takes != set(spec.defaults):
        raise ValueError(f"the registry's defaults for {name} {sorted(spec.defaults)} do not match {sorted(takes)}")
    if variant is not None and variant not in spec.variants:
        raise ValueError(f"{name} has no variant {variant!r}; variants: {sorted(spec.variants)}")
    defaults = {**spec.defaults, **(spec.variants[variant] if variant else {})}
    values = {**defaults, **{k: v for k, v in constexprs.items() if k in defaults}}  # others: not this kernel's
    signature = {}
    args = set(kernel.arg_names)
    unknown = sorted(set(ones) - args)
    if unknown:
        raise ValueError(f"{name} has no argument(s) {unknown}")
    values.update({arg: 1 for arg in ones})
    for param in kernel.params:
        if param.is_constexpr or param.name in ones:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = "*" + (
                _TRITON_DTYPES[dtype]
                if param.name in _DATA_POINTERS
                else "i32"
                if param.name in _INT32_POINTERS
                else "fp32"
            )
        elif param.name in _FLOAT_SCALARS:
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i64"
    unknown = sorted(set(divisible) - args)
    if unknown:
        raise ValueError(f"{name} has no argument(s) {unknown}")
    constants = {(kernel.arg_names.index(k),): v for k, v in values.items()}
    hinted = [
        p.name
        for p in kernel.params
        if signature[p.name] != "constexpr" and ((aligned and p.name.endswith("_ptr")) or p.name in divisible)
    ]
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in hinted}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads = _ptxas_report(ptx, arch)
    return CompiledKernel(
        name=name,
        arch=arch,
        num_warps=num_warps,
        registers=registers,
        spill_stores=spill_stores,
        spill_loads=spill_loads,
        shared_bytes=int(getattr(compiled.metadata, "shared", 0) or 0),
        ptx_lines=ptx.count("\n"),
        mma_instructions=len(re.findall(r"^\s*(?:wgmma\.mma_async|mma)\.", ptx, flags=re.MULTILINE)),
        sass=_sass(compiled.asm["cubin"]),
    )
