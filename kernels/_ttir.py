"""How many times a compiled kernel walks each of its pointer arguments, read off its Triton IR (TTIR).

Every ``tt.load`` and ``tt.store`` is traced back, through pointer arithmetic (``tt.splat``, ``tt.addptr``, ...)
and loop-carried values (``scf.for ... iter_args``), to the kernel arguments it addresses. A load or store inside
a loop over tiles walks the tensor once over the grid (one pass); a store outside loops writes the program's
share once (one pass). A load outside loops counts one pass only when no loop loads the same argument: in a
kernel that streams x in a loop, a load of x before the loop reads one tile (a shift pivot), not the tensor.
The model counts bytes issued by the code, not DRAM traffic: a second read may hit L2.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["Access", "pointer_accesses", "tensor_passes"]

_VALUE = re.compile(r"%([\w$.-]+)")
_RESULT = re.compile(r"^\s*%([\w$.-]+)(?::\d+)?\s*=\s*(.*)$")
_ITER_ARGS = re.compile(r"iter_args\((.*?)\)\s*->")
_MEMORY_OP = re.compile(r"\btt\.(load|store)\s+%([\w$.-]+)")


@dataclasses.dataclass
class Access:
    """Loads and stores of one pointer argument."""

    loads_in_loops: int = 0
    loads_outside: int = 0
    stores: int = 0

    @property
    def passes(self) -> int:
        """Full walks of the argument's tensor (see the module docstring)."""
        return self.stores + self.loads_in_loops + (self.loads_outside if self.loads_in_loops == 0 else 0)


def _header_args(ttir: str) -> list[str]:
    header = next(line for line in ttir.splitlines() if "tt.func" in line)
    signature = header[header.index("(") :]
    return re.findall(r"%([\w$.-]+):", signature)


def pointer_accesses(ttir: str) -> dict[int, Access]:
    """{position of the argument in the TTIR function signature: its Access}, for arguments loaded or stored."""
    args = _header_args(ttir)
    origin: dict[str, set[int]] = {name: {i} for i, name in enumerate(args)}
    accesses: dict[int, Access] = {}
    regions: list[bool] = []  # one entry per open region: is it a loop body?
    started = False
    for line in ttir.splitlines():
        stripped = line.strip()
        if not started:
            started = "tt.func" in stripped
            continue
        if stripped.startswith("}") and regions:
            regions.pop()
        memory = _MEMORY_OP.search(stripped)
        if memory:
            kind, pointer = memory.groups()
            for arg in origin.get(pointer, ()):
                acc = accesses.setdefault(arg, Access())
                if kind == "store":
                    acc.stores += 1
                elif any(regions):
                    acc.loads_in_loops += 1
                else:
                    acc.loads_outside += 1
        result = _RESULT.match(stripped)
        if result and not memory and "!tt.ptr" in stripped:
            name, rhs = result.groups()
            loop_args = _ITER_ARGS.search(rhs)
            if loop_args:  # each loop-carried value starts as its initial value
                for pair in loop_args.group(1).split(","):
                    if "=" in pair:
                        inner, init = (_VALUE.findall(p) for p in pair.split("=", 1))
                        if inner and init and init[0] in origin:
                            origin[inner[0]] = origin[init[0]]
            sources = set().union(*(origin.get(v, set()) for v in _VALUE.findall(rhs.split(" : ")[0])))
            if sources:
                origin[name] = sources
        if stripped.endswith("{"):
            regions.append("scf.for" in stripped or "scf.while" in stripped or stripped.startswith("} do"))
    return accesses


def tensor_passes(ttir: str, arg_names: list[str]) -> dict[str, int]:
    """{argument name: full passes over it} for the pointer arguments a kernel loads or stores; ``arg_names``
    are the names of the TTIR function's arguments in order (the non-constexpr parameters of the launch)."""
    header = _header_args(ttir)
    if len(header) != len(arg_names):
        raise ValueError(f"the TTIR function takes {len(header)} arguments, but {len(arg_names)} names were given")
    return {arg_names[i]: acc.passes for i, acc in pointer_accesses(ttir).items() if acc.passes}
