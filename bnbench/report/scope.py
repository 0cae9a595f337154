"""What one benchmark run can claim: whether it is complete, and, for a run without a GPU, what it checked and
what it cannot show (kernel timings need a GPU), with the newest committed GPU results quoted beside it.

Pure functions over a results frame and its ``results.json`` dict; they return sentences and report items.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from bnbench.report.document import Table, Text
from bnbench.report.points import geomean

__all__ = ["CACHE_RESIDENT", "GpuReference", "completeness", "cpu_scope_items", "is_gpu_run"]

#: how the harness's message of a cache-resident CPU point starts (``bnbench.bench.runner.CACHE_RESIDENT``; the
#: report reads results files and never imports the harness)
CACHE_RESIDENT = "cache-resident"


def is_gpu_run(df: pd.DataFrame) -> bool:
    """Whether any point was timed on a GPU (CUDA events or a CUDA-graph replay)."""
    return bool(df["timer"].isin(("cuda_event", "cuda_graph")).any())


def completeness(df: pd.DataFrame, meta: Mapping[str, Any] | None = None) -> str:
    """One sentence: whether the run finished, and how many of its planned points are recorded (from the
    ``run`` object of results.json: ``state``, ``points_planned``, ``points_done``)."""
    run = (meta or {}).get("run")
    run = run if isinstance(run, Mapping) else {}
    planned, state = run.get("points_planned"), run.get("state")
    if not isinstance(planned, int) or state is None:
        return (
            f"Completeness not recorded (results.json holds no run state and planned point count): {len(df)} "
            "point(s) are in results.csv; whether the run finished is unknown."
        )
    done = int((df["timer"] != "cuda_graph").sum())  # a CUDA-graph replay is a second row of its point
    if state == "complete" and done >= planned:
        return f"Complete: all {planned} planned point(s) are recorded."
    if state == "complete":
        why = "results.json says the run completed, so results.csv has lost rows"
    else:
        why = {
            "interrupted": "the run was interrupted",
            "running": "the run did not finish (it was killed, or it is still running)",
        }.get(str(state), f"the run ended in state {state!r}")
    return (
        f"INCOMPLETE: {done} of {planned} planned point(s) are recorded; {why}. The missing points are not "
        "in any table; 'bnbench bench --resume --out <this folder>' with the same options measures them."
    )


@dataclasses.dataclass(frozen=True)
class GpuReference:
    """The newest committed GPU benchmark (for a CPU run's summary): its folder, device, date and the rows of
    its headline table to quote (``bnbench.report.bench.headline_table``)."""

    folder: str
    device: str
    date: str
    headline: pd.DataFrame


def cpu_scope_items(df: pd.DataFrame, gpu: GpuReference | None = None, inspect_items: Sequence = ()) -> list:
    """What a run without a GPU timer can and cannot show: the fused kernels' correctness checks, host overhead
    and launch plans (``inspect_items``: the report items of ``bnbench inspect`` when the caller has them), the
    newest committed GPU results, and why torch.compile is slower here."""
    items: list = [
        Text(
            "Kernel timings need a GPU: this run had none, so bnbench's Triton kernels were not timed here, only "
            "checked; the times below are PyTorch eager and torch.compile on this CPU."
        )
    ]
    interp = df[df["timer"] == "interpreter"]
    if len(interp):
        ok = int((interp["status"] == "ok").sum())
        err = pd.to_numeric(interp["max_rel_err"], errors="coerce").max()
        items.append(
            Text(
                f"Correctness: bnbench's kernels ran in the Triton interpreter on {len(interp)} point(s) and matched "
                f"the float64 reference on {ok} (largest relative error {err:.2g}); see 'Interpreter-only points'."
            )
        )
    else:
        items.append(
            Text(
                "Correctness: bnbench's kernels were not checked in this run (no triton provider ran in the "
                "interpreter: --no-interpret, or not among --providers)."
            )
        )
    if inspect_items:
        items += list(inspect_items)
    else:
        items.append(
            Text(
                "Host overhead per call and launch plans of bnbench's kernels: not measured in this run (no "
                "inspection tool is part of it; on a GPU 'bnbench profile' shows GPU vs wall time per call and "
                "the kernels' launch configuration)."
            )
        )
    compiled = df[(df["provider"] == "compile") & (df["status"] == "ok") & (df["timer"] == "wall")]
    if len(compiled) and geomean(pd.to_numeric(compiled["speedup_vs_eager"], errors="coerce")) < 1:
        items.append(
            Text(
                "Why torch.compile is slower than eager here: every training pass is timed with autograd on (x, "
                "weight and bias require grad, as in training), so compile runs its AOTAutograd forward, which "
                "saves what backward needs and adds host work per call, while eager calls ATen's CPU batch-norm "
                "kernel directly. "
                "These CPU times say nothing about a GPU, where compile fuses the chain."
            )
        )
    resident = df["message"].fillna("").astype(str).str.startswith(CACHE_RESIDENT)
    if resident.any():
        items.append(
            Text(
                f"{int(resident.sum())} timed point(s) move few enough bytes to stay in the CPU's last-level cache "
                "(nothing flushes it between calls on CPU): their bandwidth is the cache's, not memory's, and their "
                "fraction of the copy bandwidth (measured with a copy larger than the cache) can exceed 1."
            )
        )
    if pd.to_numeric(df["peak_mem_mb"], errors="coerce").isna().all():
        items.append(Text("Peak memory (peak_mem_mb) is measured with CUDA's allocator only: empty in this run."))
    if gpu is None:
        items.append(Text("GPU results: none are committed under reports/ yet (see reports/README.md)."))
    else:
        items.append(Text(f"Newest committed GPU results: {gpu.device}, {gpu.date}, in {gpu.folder} (headline below)."))
        items.append(Table(gpu.headline))
    return items
