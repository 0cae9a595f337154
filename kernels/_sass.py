"""A small reader of SASS (the GPU's machine code, as ``cuobjdump -sass`` or ``nvdisasm`` print it): loops, global
load and store widths, asynchronous copies (cp.async = LDGSTS) and barriers.

A loop is found by its backward branch: a ``BRA`` whose target lies before its own address (a branch to itself
is the padding after the last ``EXIT``, not a loop). The loop's body is every instruction from the
target to the branch. ``cuobjdump`` prints absolute targets (``BRA 0x4c0``), ``nvdisasm`` labels
(``BRA `(.L_x_3)``); both are read. Widths: ``LDG.E.128`` moves 128 bits per thread, ``.64`` 64, ``.U16``/``.S16``
16, ``.U8``/``.S8`` 8, none of these 32.
"""

from __future__ import annotations

import collections
import dataclasses
import re

__all__ = ["Instruction", "Loop", "SassSummary", "access_bits", "loops", "parse_sass", "summarize"]

_ADDRESS = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")
_HEX_TARGET = re.compile(r"^(0x[0-9a-fA-F]+)")
_LABEL_TARGET = re.compile(r"`\((\.L\w+)\)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers: "LDG.E.128", "BAR.SYNC.DEFER_BLOCKING"
    operands: str
    predicated: bool
    target: int | None = None  # branch target address, for BRA

    @property
    def base(self) -> str:
        """The opcode without modifiers: "LDG"."""
        return self.opcode.split(".")[0]


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction of the body (the branch target)
    end: int  # address of the backward branch

    def contains(self, ins: Instruction) -> bool:
        return self.start <= ins.address <= self.end


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of SASS text (one function, or several: addresses then restart, so call this per
    function; ``cuobjdump -sass`` of one Triton kernel holds one)."""
    labels: dict[str, int] = {}
    pending_labels: list[str] = []
    raw: list[tuple[int, str]] = []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending_labels.append(label.group(1))
            continue
        m = _ADDRESS.search(line)
        if not m or not m.group(2):
            continue
        address = int(m.group(1), 16)
        for name in pending_labels:
            labels[name] = address
        pending_labels = []
        raw.append((address, m.group(2)))
    out = []
    for address, body in raw:
        predicated = bool(_PREDICATE.match(body))
        body = _PREDICATE.sub("", body, count=1)
        opcode, _, operands = body.partition(" ")
        operands = operands.strip()
        target = None
        if opcode.split(".")[0] == "BRA":
            hex_target = _HEX_TARGET.match(operands.split(",")[-1].strip()) or _HEX_TARGET.match(operands)
            named = _LABEL_TARGET.search(operands)
            if hex_target:
                target = int(hex_target.group(1), 16)
            elif named and named.group(1) in labels:
                target = labels[named.group(1)]
        out.append(Instruction(address, opcode, operands, predicated, target))
    return out


def loops(instructions: list[Instruction]) -> list[Loop]:
    """Every loop, by its backward branch, in address order of the branch."""
    return [Loop(i.target, i.address) for i in instructions if i.target is not None and i.target < i.address]


def access_bits(opcode: str) -> int:
    """Bits per thread moved by a load or store opcode (LDG.E.128 -> 128)."""
    mods = set(opcode.split(".")[1:])
    for width in ("256", "128", "64"):
        if width in mods:
            return int(width)
    if mods & {"U16", "S16"}:
        return 16
    if mods & {"U8", "S8"}:
        return 8
    return 32


@dataclasses.dataclass(frozen=True)
class SassSummary:
    """What decides a streaming kernel's speed, read off its SASS."""

    instructions: int
    loops: int
    loops_with_loads: int  # loops holding a global load (LDG or LDGSTS): the hot loops
    ldg_bits: dict[int, int]  # global loads by width in bits (whole kernel)
    stg_bits: dict[int, int]  # global stores by width
    main_load_bits: int | None  # the load width moving the most data in the hot loops (whole kernel if none)
    ldgsts: int  # asynchronous global-to-shared copies (cp.async), whole kernel
    ldgsts_in_loops: int
    bar_sync: int  # BAR.SYNC / BAR.RED (block-wide barriers), whole kernel
    bar_sync_in_loops: int  # barriers inside the hot loops (each counted once even in nested loops)

    @property
    def pipelined(self) -> bool:
        """Loads in the hot loops go through cp.async (LDGSTS), so several tiles are in flight per thread."""
        return self.ldgsts_in_loops > 0


def _is_barrier(ins: Instruction) -> bool:
    return ins.opcode.startswith(("BAR.SYNC", "BAR.RED"))


def summarize(text: str) -> SassSummary:
    """Loop, load and barrier facts of one function's SASS text."""
    code = parse_sass(text)
    found = loops(code)
    hot = [lp for lp in found if any(lp.contains(i) and i.base in ("LDG", "LDGSTS") for i in code)]

    def in_hot(ins: Instruction) -> bool:
        return any(lp.contains(ins) for lp in hot)

    ldg = collections.Counter(access_bits(i.opcode) for i in code if i.base == "LDG")
    stg = collections.Counter(access_bits(i.opcode) for i in code if i.base == "STG")
    loads = [i for i in code if i.base in ("LDG", "LDGSTS")]
    hot_loads = [i for i in loads if in_hot(i)] or loads
    moved = collections.Counter()  # bits per thread moved by the loads of each width
    for ins in hot_loads:
        moved[access_bits(ins.opcode)] += access_bits(ins.opcode)
    main = max(moved, key=lambda bits: (moved[bits], bits)) if moved else None
    return SassSummary(
        instructions=len(code),
        loops=len(found),
        loops_with_loads=len(hot),
        ldg_bits=dict(sorted(ldg.items())),
        stg_bits=dict(sorted(stg.items())),
        main_load_bits=main,
        ldgsts=sum(i.base == "LDGSTS" for i in code),
        ldgsts_in_loops=sum(i.base == "LDGSTS" and in_hot(i) for i in code),
        bar_sync=sum(_is_barrier(i) for i in code),
        bar_sync_in_loops=sum(_is_barrier(i) and in_hot(i) for i in code),
    )
