"""Tables and the Markdown summary of one benchmark run (a frame with ``bnbench.schema.BENCH_COLUMNS``).

Every table function returns a DataFrame of raw numbers. Speedups are the harness's ``speedup_vs_eager`` and
``speedup_vs_compile`` columns: baseline median time / provider median time, so > 1 means faster than the
baseline. Only timed points (status ok, a real timer) enter speed tables; interpreter points and failures are
listed separately, never averaged in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from bnbench.report.bench_plots import bench_figures
from bnbench.report.bn_total import bn_total_sections
from bnbench.report.document import Section, Table, Text, to_markdown
from bnbench.report.points import case_label, geomean, is_baseline, sort_points, timed_points
from bnbench.report.scope import GpuReference, completeness, cpu_scope_items, is_gpu_run

__all__ = [
    "bench_figures",
    "bench_sections",
    "environment_table",
    "extreme_points",
    "headline_table",
    "interpreter_table",
    "not_ok_points",
    "op_family",
    "over_copy_bandwidth",
    "points_table",
    "sidecar_environment",
    "summary_markdown",
]

PROVENANCE = (
    "run_id", "timestamp_utc", "git_sha", "bnbench_version", "torch_version", "triton_version", "device_name",
    "peak_copy_gbps",
)  # fmt: skip
#: columns shown for a single point in the best/worst and problem tables
_POINT_COLUMNS = ["case", "provider", "timer", "ms_p50", "speedup_vs_eager", "speedup_vs_compile", "frac_of_copy_bw"]


#: sidecar environment fields already shown from the CSV's provenance columns
_SHOWN = {"bnbench_version", "torch_version", "triton_version", "git_sha", "device.name"}


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, Mapping):
        out: list[tuple[str, str]] = []
        for key, value in obj.items():
            out += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [(prefix, str(obj))]


def sidecar_environment(meta: Mapping[str, Any] | None, skip: Sequence[str] = ()) -> pd.DataFrame:
    """The ``environment`` object of results.json as field/value rows (nested keys joined by dots), minus
    ``skip``; empty when there is none."""
    env = (meta or {}).get("environment")
    rows = _flatten(env) if isinstance(env, Mapping) else []
    return pd.DataFrame([r for r in rows if r[0] not in skip], columns=["field", "value"])


def environment_table(df: pd.DataFrame, meta: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Provenance (distinct values of each column), how many points had each status, and the rest of the
    environment recorded in results.json (``meta``), each field once."""
    rows = []
    for column in PROVENANCE:
        values = [str(v) for v in dict.fromkeys(df[column].dropna())]
        if column == "timestamp_utc" and len(values) > 2:  # one per point: the span says enough
            values = [f"{min(values)} to {max(values)}"]
        rows.append({"field": column, "value": ", ".join(values) if values else "(not recorded)"})
    counts = df["status"].value_counts()
    status = ", ".join(f"{name} {int(counts[name])}" for name in counts.index)
    rows.append({"field": "points", "value": f"{len(df)} ({status})" if len(df) else "0"})
    table = pd.DataFrame(rows, columns=["field", "value"])
    return pd.concat([table, sidecar_environment(meta, skip=_SHOWN)], ignore_index=True)


def op_family(op: str) -> str:
    """The ``bnbench bench --op`` an ``op`` value belongs to: bn1d/bn2d are bn_act's, bn1d_add/bn2d_add (a residual
    added before the activation, bnbench.bench.cases.ResidualCase) bn_add_act's; the matmul ops are their own."""
    op = str(op)
    if op in ("bn1d", "bn2d"):
        return "bn_act"
    return "bn_add_act" if op in ("bn1d_add", "bn2d_add") else op


def headline_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per dtype, pass, provider and timer: geometric-mean (and worst) speedup vs eager and vs compile, and the
    median and largest fraction of the copy bandwidth reached. One row per group of timed points; per op family
    too (a leading column ``op_family``, :func:`op_family`) when the run measured more than one."""
    timed = timed_points(df)
    columns = [
        "dtype", "pass", "provider", "timer", "points", "geomean_vs_eager", "geomean_vs_compile", "min_vs_eager",
        "min_vs_compile", "median_frac_copy_bw", "max_frac_copy_bw",
    ]  # fmt: skip
    families = timed["op"].map(op_family) if len(timed) else pd.Series(dtype=object)
    if families.nunique() > 1:
        return pd.concat(
            [headline_table(df[df["op"].map(op_family) == family]).assign(op_family=family)
             for family in dict.fromkeys(families)],
            ignore_index=True,
        )[["op_family", *columns]]  # fmt: skip
    rows = []
    for (dtype, pass_, provider, timer), group in timed.groupby(["dtype", "pass", "provider", "timer"], sort=False):
        vs_eager = pd.to_numeric(group["speedup_vs_eager"], errors="coerce")
        vs_compile = pd.to_numeric(group["speedup_vs_compile"], errors="coerce")
        frac = pd.to_numeric(group["frac_of_copy_bw"], errors="coerce")
        rows.append(
            {
                "dtype": dtype,
                "pass": pass_,
                "provider": provider,
                "timer": timer,
                "points": len(group),
                "geomean_vs_eager": geomean(vs_eager),
                "geomean_vs_compile": geomean(vs_compile),
                "min_vs_eager": vs_eager.min(),
                "min_vs_compile": vs_compile.min(),
                "median_frac_copy_bw": frac.median(),
                "max_frac_copy_bw": frac.max(),
            }
        )
    return sort_points(pd.DataFrame(rows, columns=columns)).reset_index(drop=True)


def _point_rows(df: pd.DataFrame) -> pd.DataFrame:
    out = df.assign(case=case_label(df)) if len(df) else df.assign(case=pd.Series(dtype=object))
    return out


def extreme_points(df: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """The ``n`` best and ``n`` worst timed points of each non-baseline provider, ranked by the speedup over
    the faster of the two baselines (the smaller of speedup_vs_eager and speedup_vs_compile)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    timed = timed_points(df)
    timed = timed[~is_baseline(timed["is_baseline"])] if len(timed) else timed
    columns = ["rank", *_POINT_COLUMNS, "vs_faster_baseline"]
    if timed.empty:
        return pd.DataFrame(columns=columns)
    speedups = timed[["speedup_vs_eager", "speedup_vs_compile"]].apply(pd.to_numeric, errors="coerce")
    timed = _point_rows(timed).assign(vs_faster_baseline=speedups.min(axis=1, skipna=True))
    timed = timed[timed["vs_faster_baseline"].notna()]
    parts = []
    for _, group in timed.groupby("provider", sort=False):
        ranked = group.sort_values("vs_faster_baseline", ascending=False, kind="stable")
        n_best = min(n, -(-len(ranked) // 2))  # with few points, split them instead of listing one twice
        n_worst = min(n, len(ranked) - n_best)
        parts.append(ranked.head(n_best).assign(rank="best"))
        if n_worst:
            parts.append(ranked.tail(n_worst).iloc[::-1].assign(rank="worst"))
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts)[columns].reset_index(drop=True)


def not_ok_points(df: pd.DataFrame) -> pd.DataFrame:
    """Every point whose status is not ok (incorrect, error, oom, skipped), with the reason."""
    bad = df[df["status"] != "ok"]
    columns = ["case", "provider", "timer", "status", "max_rel_err", "message"]
    if bad.empty:
        return pd.DataFrame(columns=columns)
    return _point_rows(sort_points(bad))[columns].reset_index(drop=True)


def over_copy_bandwidth(df: pd.DataFrame) -> pd.DataFrame:
    """Timed points whose effective bandwidth exceeds the measured copy bandwidth: caches, not DRAM, served
    them (or the bytes model undercounts); such numbers must not be read as DRAM efficiency."""
    timed = timed_points(df)
    frac = pd.to_numeric(timed["frac_of_copy_bw"], errors="coerce")
    over = timed[frac > 1.0]
    if over.empty:
        return pd.DataFrame(columns=_POINT_COLUMNS)
    return _point_rows(sort_points(over))[_POINT_COLUMNS].reset_index(drop=True)


def interpreter_table(df: pd.DataFrame) -> pd.DataFrame:
    """Points run under the Triton interpreter (correctness only), counted per provider and status."""
    interp = df[df["timer"] == "interpreter"]
    if interp.empty:
        return pd.DataFrame(columns=["provider", "status", "points", "max_rel_err"])
    grouped = interp.groupby(["provider", "status"], sort=False)
    table = grouped.agg(points=("status", "size"), max_rel_err=("max_rel_err", "max")).reset_index()
    return table


def points_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every point of the run, one row each, in reading order: case, provider, timer, status, times and the
    derived figures (the page's per-point table)."""
    columns = ["case", "provider", "timer", "status", "ms_p20", "ms_p50", "ms_p80", "speedup_vs_eager",
               "speedup_vs_compile", "frac_of_copy_bw", "compile_s", "peak_mem_mb", "max_rel_err", "message"]  # fmt: skip
    if df.empty:
        return pd.DataFrame(columns=columns)
    table = _point_rows(sort_points(df))[columns]
    if table["peak_mem_mb"].isna().all():  # measured on CUDA only
        table = table.drop(columns=["peak_mem_mb"])
    return table.reset_index(drop=True)


def bench_sections(
    df: pd.DataFrame,
    *,
    level: int = 2,
    model_calls: dict | None = None,
    meta: Mapping[str, Any] | None = None,
    gpu: GpuReference | None = None,
    inspect_items: Sequence = (),
) -> list[Section]:
    """The summary of one benchmark run as report sections: environment and completeness, on a run without a
    GPU what it can and cannot show (``bnbench.report.scope``), headline, with ``model_calls`` (a network's BN
    call table) the call-weighted BN + activation time per training step, extremes, problems."""
    timed = timed_points(df)
    headline = headline_table(df)
    method = Text(
        "Speedup = baseline median time / provider median time (> 1: faster than the baseline); geometric means "
        "over the points of each group; fraction of copy bandwidth = effective bandwidth (minimal bytes / median "
        "time) over the copy bandwidth measured in the same run. Only points with status ok and a real timer are "
        "included."
    )
    headline_items: list = [method]
    if timed.empty:
        headline_items.append(Text("No timed points: nothing to put in a speed table."))
    else:
        headline_items.append(Table(headline))
    sections = [Section("Environment", [Text(completeness(df, meta)), Table(environment_table(df, meta))], level)]
    if len(df) and not is_gpu_run(df):
        sections.append(Section("What this run can and cannot show", cpu_scope_items(df, gpu, inspect_items), level))
    sections.append(Section("Headline: speedups and bandwidth", headline_items, level))
    sections += bn_total_sections(df, model_calls, level=level)
    extremes = extreme_points(df)
    if len(extremes):
        sections.append(
            Section(
                "Best and worst points",
                [Text("Ranked by the speedup over the faster of eager and compile."), Table(extremes)],
                level,
            )
        )
    over = over_copy_bandwidth(df)
    if len(over):
        sections.append(
            Section(
                "Points above the copy bandwidth",
                [Text(f"{len(over)} point(s) exceed 100% of the copy bandwidth: caches served them."), Table(over)],
                level,
            )
        )
    bad = not_ok_points(df)
    counts = bad["status"].value_counts() if len(bad) else pd.Series(dtype=int)
    summary = ", ".join(f"{int(counts[s])} {s}" for s in counts.index) or "none"
    sections.append(
        Section(
            "Incorrect, failed and skipped points",
            [Text(f"Points not ok: {summary}.")] + ([Table(bad)] if len(bad) else []),
            level,
        )
    )
    interp = interpreter_table(df)
    if len(interp):
        n = int(interp["points"].sum())
        note = Text(
            f"{n} point(s) ran under the Triton interpreter (a numpy simulation): they were checked for "
            "correctness and are excluded from every speed table and plot."
        )
        sections.append(Section("Interpreter-only points", [note, Table(interp)], level))
    return sections


def summary_markdown(
    df: pd.DataFrame,
    title: str = "Benchmark summary",
    model_calls: dict | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    gpu: GpuReference | None = None,
    inspect_items: Sequence = (),
) -> str:
    """``summary.md`` of one run: environment and completeness, the CPU scope note on a run without a GPU, the
    headline table (and, for a network's cases, the call-weighted BN + activation time per step), best and worst
    points, problem points."""
    sections = bench_sections(df, model_calls=model_calls, meta=meta, gpu=gpu, inspect_items=inspect_items)
    return to_markdown(sections, title=title)
