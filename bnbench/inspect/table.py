"""Run the inspection over cases and format it: DataFrames of launches, passes and host times, a markdown summary
and the JSON document of ``bnbench inspect --json``. Pure computation (the CLI writes the files)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import pandas as pd

from bnbench.bench.cases import Case
from bnbench.inspect.plan import COPY_GBPS, launch_rows, pass_summary
from bnbench.inspect.record import record_pass

__all__ = ["EXECUTED", "SCHEMA", "Inspection", "format_summary", "inspect_cases", "to_json"]

SCHEMA = "bnbench-inspect/1"
EXECUTED = (
    "Nothing was executed on a GPU. bnbench's launchers ran on uninitialised CPU tensors under a recording Triton "
    "driver: argument checks, planning, Triton's binder, specialisation and cache, and the real compiler for the "
    "target ran; each launch was recorded instead of made. Compiled facts are read off the cubins "
    "(cuobjdump); waves, occupancy, bytes and times are modelled; host times are measured on this CPU."
)


@dataclasses.dataclass
class Inspection:
    target: str
    launches: pd.DataFrame  # one row per recorded launch
    passes: pd.DataFrame  # one row per (case, pass)
    host: pd.DataFrame | None = None  # host microseconds per call, eager beside triton

    @property
    def errors(self) -> int:
        return int((self.passes["status"] != "ok").sum()) if len(self.passes) else 0


def inspect_cases(cases: Iterable[Case], target, progress: Callable[[Case], None] | None = None) -> Inspection:
    """Record every case's pass, compile its kernels for ``target`` and read their facts. A case whose kernels
    fail to compile gets status ``error`` with the message (the others go on). ``progress`` is called after
    each case."""
    launches, passes = [], []
    for case in cases:
        try:
            record = record_pass(case, target)
            launches += launch_rows(record, target)
            passes.append({**pass_summary(record, target), "status": "ok", "message": ""})
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as err:  # a compiler error is a finding about that case, not a crash of the table
            message = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            passes.append({**case.columns(), "target": target.name, "status": "error", "message": message})
        if progress is not None:
            progress(case)
    return Inspection(target.name, pd.DataFrame(launches), pd.DataFrame(passes))


def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(int(value) if fmt == "d" else value, fmt)  # pandas holds int columns with gaps as floats


_LAUNCH_COLUMNS = [
    ("case", None), ("pass", None), ("kernel", None), ("grid", None), ("tiles", None), ("num_warps", "d"),
    ("registers", "d"), ("spill_bytes", "d"), ("shared_bytes", "d"), ("blocks_per_sm", "d"),
    ("programs_per_sm", ".1f"), ("waves_modelled", "d"), ("main_load_bits", "d"), ("ldgsts_in_loops", "d"),
    ("bar_sync_in_loops", "d"),
]  # fmt: skip
_PASS_COLUMNS = [
    ("case", None), ("pass", None), ("path", None), ("triton_launches", "d"), ("aten_kernel_launches", "d"),
    ("bytes_vs_floor", ".2f"), ("us_modelled", ".1f"), ("us_at_floor_modelled", ".1f"), ("status", None),
]  # fmt: skip


def _case_label(row) -> str:
    layout = "" if row["op"] == "bn1d" else f" {row['layout']}"
    return f"{row['dtype']} {row['shape']}{layout} {row['activation']}"


def _markdown(frame: pd.DataFrame, columns) -> list[str]:
    if frame is None or not len(frame):
        return ["(none)"]
    lines = ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame.iterrows():
        cells = []
        for name, fmt in columns:
            value = _case_label(row) if name == "case" else row.get(name)
            cells.append(str(value) if fmt is None else _num(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _key_figures(result: Inspection) -> list[str]:
    """Per kernel over every launch: registers, spills, main load widths, cp.async and barriers in loops; per pass
    kind: launches, hidden aten kernels and bytes over the floor (the figures to compare before and after)."""
    if not len(result.launches) or not len(result.passes):
        return []
    lines = ["## Key figures", "", "| kernel | launches | registers | spill bytes (max) | main load bits | "
             "LDGSTS in loops (max) | BAR.SYNC in loops |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for kernel, rows in result.launches.groupby("kernel", sort=True):
        bits = ", ".join(str(int(b)) for b in sorted(rows["main_load_bits"].dropna().unique()))
        bars = ", ".join(str(int(b)) for b in sorted(rows["bar_sync_in_loops"].dropna().unique()))
        lines.append(
            f"| {kernel} | {len(rows)} | {_num(rows['registers'].min(), 'd')}-{_num(rows['registers'].max(), 'd')} | "
            f"{_num(rows['spill_bytes'].max(), 'd')} | {bits} | {_num(rows['ldgsts_in_loops'].max(), 'd')} | {bars} |"
        )
    ok = result.passes[result.passes["status"] == "ok"]
    lines += ["", "| pass | cases | bnbench launches | aten kernel launches | bytes over the floor (modelled) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for pass_, rows in ok.groupby("pass", sort=False):
        spans = {c: f"{_num(rows[c].min(), f)}-{_num(rows[c].max(), f)}" for c, f in
                 (("triton_launches", "d"), ("aten_kernel_launches", "d"), ("bytes_vs_floor", ".2f"))}  # fmt: skip
        lines.append(f"| {pass_} | {len(rows)} | {' | '.join(spans.values())} |")
    return [*lines, ""]


def format_summary(
    result: Inspection, *, title: str = "bnbench inspect", regenerate: str = "", provenance: dict | None = None
) -> str:
    """The inspection as markdown: what ran, the passes, the launches and (if measured) the host times."""
    lines = [f"# {title}", "", f"Target: {result.target}. {EXECUTED}", ""]
    if provenance:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in provenance.items()) + ".", ""]
    if regenerate:
        lines += [f"Regenerate: `{regenerate}`", ""]
    lines += _key_figures(result)
    lines += [
        "## Passes", "",
        f"Launches per pass (bnbench's kernels, and aten ops that would launch a CUDA kernel). bytes_vs_floor: bytes "
        f"the kernels' code issues (modelled from the TTIR) over the pass's minimal bytes (2T forward, 3T backward, "
        f"2T eval). Times are modelled at {COPY_GBPS:.0f} GB/s (H200 copy bandwidth, MEASURE.md).", "",
        *_markdown(result.passes, _PASS_COLUMNS), "",
        "## Launches", "",
        "Registers per thread, spill (local) bytes and shared memory from the cubin; blocks per SM from the "
        "occupancy model; waves = programs / (SMs x blocks per SM), modelled; load width in bits of the loads "
        "moving the most data in the hot loops; LDGSTS (cp.async) and BAR.SYNC counted inside the loops that load.",
        "", *_markdown(result.launches, _LAUNCH_COLUMNS), "",
    ]  # fmt: skip
    if result.host is not None:
        lines += ["## Host time per call (measured on this CPU)", "", _HOST_NOTE, ""]
        lines += [*_markdown(result.host, _HOST_COLUMNS), ""]
    return "\n".join(lines)


_HOST_NOTE = (
    "Median microseconds of host time per call after warm-up, eager beside triton on the same input in one run. "
    "eager ran PyTorch's CPU kernels on the input (its time includes that compute); triton ran its whole host path "
    "with every launch recorded, not made (no GPU work, no CUDA launch call)."
)
_HOST_COLUMNS = [
    ("provider", None), ("pass", None), ("shape", None), ("dtype", None), ("layout", None), ("us_p50", ".1f"),
    ("us_p20", ".1f"), ("us_p80", ".1f"), ("ratio_vs_eager", ".2f"), ("launches_per_call", "d"),
    ("aten_kernel_launches", "d"), ("executed", None),
]  # fmt: skip


def to_json(result: Inspection, provenance: dict | None = None) -> dict:
    """The JSON document: schema, target, what was executed, and the rows of each table."""

    def records(frame):
        if frame is None:
            return None
        return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                for r in frame.to_dict(orient="records")]  # fmt: skip

    return {
        "schema": SCHEMA, "target": result.target, "executed": EXECUTED, "provenance": provenance or {},
        "passes": records(result.passes),
        "launches": records(result.launches), "host": records(result.host),
    }  # fmt: skip
