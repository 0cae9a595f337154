"""The sweep: measure every (case, provider) point, check it against the float64 reference, return rows.

A point never aborts the sweep: an exception becomes a row with status ``error`` (or ``oom``) and its message;
a provider that cannot run a case here gives a ``skipped`` row saying why. Ctrl-C (KeyboardInterrupt) is the one
exception let through. This module touches no file: the CLI writes what it returns.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import math
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from bnbench.bench import workload
from bnbench.bench.bytes_model import frac_of_copy, gbps
from bnbench.bench.cases import BN_OPS, Case
from bnbench.bench.providers import Provider
from bnbench.bench.timing import Timing, interpreter_timing, time_cuda_events, time_cuda_graph, time_wall
from bnbench.device import synchronize
from bnbench.schema import BENCH_COLUMNS, DIST_COLUMNS, POINT_KEY
from bnbench.testing import tolerance

__all__ = [
    "CACHE_RESIDENT",
    "SPEED_TIMERS",
    "PointResult",
    "RunContext",
    "TimingSettings",
    "add_speedups",
    "base_row",
    "check_outputs",
    "error_message",
    "fill_timing",
    "is_oom",
    "measure_point",
    "plan_points",
    "point_id",
    "provenance_from_env",
    "results_frame",
    "run_sweep",
]

#: timers whose numbers are speeds (the interpreter's are not)
SPEED_TIMERS = ("cuda_event", "cuda_graph", "wall")
#: cases at most this many minimal bytes also get a CUDA-graph replay row when asked (launch-bound sizes)
CUDA_GRAPH_MAX_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class TimingSettings:
    """How long to time: do_bench's warmup/rep (ms) on a GPU; warm-up calls, sample counts and a time budget
    per point on CPU. ``cuda_graph`` adds a CUDA-graph replay row for small fwd/eval points on a GPU."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_warmup: int = 3
    cpu_warmup_s: float = 0.1
    cpu_min_samples: int = 20
    cpu_max_samples: int = 200
    cpu_budget_s: float = 0.3
    cuda_graph: bool = False


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every point of a run shares: the device, the measured copy bandwidth and the provenance columns;
    on CPU the last-level cache's size (``cache_bytes``), to mark timings of working sets that fit in it."""

    device: torch.device
    copy_gbps: float
    provenance: dict[str, object]
    seed: int = 0
    timing: TimingSettings = TimingSettings()
    cache_bytes: int | None = None


@dataclasses.dataclass
class PointResult:
    """One results row (the schema's columns) and the raw timing samples behind it."""

    row: dict[str, object]
    samples_ms: list[float]


def provenance_from_env(info: dict, run_id: str) -> dict[str, object]:
    """The provenance columns from :func:`bnbench.envinfo.collect`'s dict."""
    return {
        "run_id": run_id,
        "git_sha": info.get("git_sha"),
        "bnbench_version": info.get("bnbench_version"),
        "torch_version": info.get("torch_version"),
        "triton_version": info.get("triton_version"),
        "device_name": info.get("device", {}).get("name"),
    }


def point_id(row: dict | pd.Series) -> str:
    """A stable name for a point (case, provider and timer), used as the key of the raw samples."""
    return "|".join(str(row[k]) for k in ("provider", "timer", *POINT_KEY))


def plan_points(
    cases: Sequence[Case], providers: Sequence[Provider], done: Iterable[tuple] = ()
) -> list[tuple[Case, Provider]]:
    """The points to measure, case by case (providers side by side), minus those whose ``(*case.key(),
    provider)`` is in ``done`` (--resume)."""
    finished = set(done)
    return [(c, p) for c in cases for p in providers if (*c.key(), p.name) not in finished]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _workload(case):
    """The module that builds, runs and checks the case's op: :mod:`workload` for BatchNorm + activation (with
    or without a residual), :mod:`gemm_workload` for the matmul + BatchNorm ops (``case.family``)."""
    if case.family in BN_OPS:
        return workload
    from bnbench.bench import gemm_workload

    return gemm_workload


def _bytes_min(case) -> int:
    return _workload(case).bytes_min_of(case)


def base_row(case: Case, provider: Provider, ctx: RunContext) -> dict[str, object]:
    row: dict[str, object] = dict.fromkeys(BENCH_COLUMNS, math.nan)
    row.update(ctx.provenance)
    row.update(case.columns())
    row.update(
        timestamp_utc=_now(), peak_copy_gbps=ctx.copy_gbps, provider=provider.name,
        is_baseline=provider.is_baseline, kernel_config="", timer=None, n_samples=0,
        bytes_min=_bytes_min(case), status="error", message="",
    )  # fmt: skip
    return row


def is_oom(err: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(err, MemoryError) or (oom_type and isinstance(err, oom_type)):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def error_message(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:400]}"


def fill_timing(row: dict, timing: Timing, copy_gbps: float) -> None:
    row.update(timer=timing.timer, n_samples=timing.n_samples)
    row.update(ms_p20=timing.ms_p20, ms_p50=timing.ms_p50, ms_p80=timing.ms_p80)
    if timing.timer in SPEED_TIMERS:
        row["gbps"] = gbps(row["bytes_min"], row["ms_p50"])
        row["frac_of_copy_bw"] = frac_of_copy(row["gbps"], copy_gbps)


def _peak_mem_mb(case: Case, run, inp, device: torch.device) -> float:
    """GPU memory of one more call: for fwd_bwd, the memory held between forward and backward (the output
    plus what autograd saved); otherwise the peak above what was allocated before the call."""
    inp.zero_grads()
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    if case.pass_ == "fwd_bwd":
        y = run.forward()
        synchronize(device)
        held = torch.cuda.memory_allocated(device) - base
        y.backward(inp.dy)
        del y
        return held / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    run.call()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def check_outputs(row: dict, case: Case, inp, run, running0: tuple[torch.Tensor, torch.Tensor], reference=None) -> None:
    """Compare what the checked call produced with the float64 reference; fills ``max_rel_err``, ``status``
    (ok or incorrect) and ``message``. ``reference(running_mean0, running_var0, y)`` replaces
    the case's workload module's ``reference_outputs`` (the distributed benchmark's global-batch reference). The
    outputs are checked at the dtype's tolerance, the batch statistics at the workload's ``stats_tolerance``."""
    wl = _workload(case)
    got = wl.outputs(case, inp, run.last_output())
    if reference is None:
        ref = wl.reference_outputs(case, inp, *running0, run.last_output())
    else:
        ref = reference(*running0, run.last_output())
    got_stats, ref_stats = wl.batch_statistics(got, *running0), wl.batch_statistics(ref, *running0)
    err, worst = wl.max_rel_err(got, ref)
    stats_err, stats_worst = wl.max_rel_err(got_stats, ref_stats) if ref_stats else (0.0, "")
    row["max_rel_err"] = max(err, stats_err)
    failures = [
        f"max_rel_err {e:.3g} in {name} > tolerance {tol:g} ({kind})"
        for e, name, tol, kind in (
            (err, worst, tolerance(case.dtype), case.dtype),
            (stats_err, stats_worst, wl.stats_tolerance(case), "fp32 running statistics"),
        )
        if not e <= tol
    ]
    if failures:
        row.update(status="incorrect", message="; ".join(failures))
    else:
        row["status"] = "ok"


#: the start of the message of a CPU point whose bytes fit in the last-level cache (``bnbench.report`` counts them)
CACHE_RESIDENT = "cache-resident"


def _bandwidth_note(row: dict, device: torch.device, cache_bytes: int | None) -> str:
    """Why a timed point's bandwidth is not a memory bandwidth, if it is not ("" otherwise): on CPU its bytes fit
    in the last-level cache (nothing flushes it between calls), or it beat the copy bandwidth."""
    if device.type == "cpu" and cache_bytes and row["bytes_min"] <= cache_bytes:
        return (
            f"{CACHE_RESIDENT}: {row['bytes_min'] / 2**20:.3g} MiB per call fits in the CPU's "
            f"{cache_bytes / 2**20:.0f} MiB last-level cache, so its bandwidth is the cache's, not memory's"
        )
    if row["frac_of_copy_bw"] > 1:
        return "effective bandwidth above the copy bandwidth: cache effects, not a real rate"
    return ""


def measure_point(case: Case, provider: Provider, ctx: RunContext) -> list[PointResult]:
    """Check and time one point; returns its row (two rows when a CUDA-graph replay is added). Never raises
    but for KeyboardInterrupt."""
    device = ctx.device
    row = base_row(case, provider, ctx)
    reason = provider.skip_reason(case, device)
    if reason:
        row.update(status="skipped", message=reason)
        return [PointResult(row, [])]
    timer = provider.timer(device) or ("cuda_event" if device.type == "cuda" else "wall")
    row["timer"] = timer
    extra: list[PointResult] = []
    samples: list[float] = []
    inp = run = None
    wl = _workload(case)
    try:
        inp = wl.make_inputs(case, device, ctx.seed)
        row["kernel_config"] = provider.kernel_config(case, inp.x)
        run = wl.build_pass(case, provider.make(case), inp)
        running0 = (inp.running_mean.clone(), inp.running_var.clone())
        synchronize(device)
        start = time.perf_counter()
        run.prepare()
        run.call()
        synchronize(device)
        row["compile_s"] = time.perf_counter() - start  # first-call latency: compile, JIT, autotuning
        check_outputs(row, case, inp, run, running0)
        settings = ctx.timing
        grads = inp.params() if case.needs_grad else None
        if timer == "interpreter":
            timing = interpreter_timing()
            row["message"] = (row["message"] + "; " if row["message"] else "") + (
                "Triton interpreter: correctness only, not timed"
            )
        elif device.type == "cuda":
            timing = time_cuda_events(
                run.call, grad_to_none=grads, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms
            )
        else:
            timing = time_wall(
                run.call, reset=inp.zero_grads if grads else None, warmup=settings.cpu_warmup, warmup_s=settings.cpu_warmup_s,
                min_samples=settings.cpu_min_samples, max_samples=settings.cpu_max_samples,
                budget_s=settings.cpu_budget_s,
            )  # fmt: skip
        fill_timing(row, timing, ctx.copy_gbps)
        samples = list(timing.samples_ms)
        if row["status"] == "ok" and timing.timer in SPEED_TIMERS:
            row["message"] = _bandwidth_note(row, device, ctx.cache_bytes)
        if device.type == "cuda":
            row["peak_mem_mb"] = _peak_mem_mb(case, run, inp, device)
            if settings.cuda_graph and case.pass_ in ("fwd", "eval") and row["bytes_min"] <= CUDA_GRAPH_MAX_BYTES:
                extra.append(_graph_point(row, run, settings, ctx.copy_gbps))
    except KeyboardInterrupt:
        raise
    except Exception as err:  # a failing point is recorded; the sweep goes on
        row.update(status="oom" if is_oom(err) else "error", message=error_message(err))
    finally:
        del inp, run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return [PointResult(row, samples), *extra]


def _graph_point(row: dict, run, settings: TimingSettings, copy_gbps: float) -> PointResult:
    """The same point replayed from a CUDA graph (launch overhead removed); its own row, timer cuda_graph."""
    graph_row = dict(row, peak_mem_mb=math.nan, message="")
    try:
        timing = time_cuda_graph(run.call, rep_ms=settings.rep_ms)
        fill_timing(graph_row, timing, copy_gbps)
        return PointResult(graph_row, list(timing.samples_ms))
    except KeyboardInterrupt:
        raise
    except Exception as err:
        graph_row.update(timer="cuda_graph", n_samples=0, ms_p20=math.nan, ms_p50=math.nan, ms_p80=math.nan)
        graph_row.update(gbps=math.nan, frac_of_copy_bw=math.nan, status="error", message=error_message(err))
        return PointResult(graph_row, [])


#: a provider is compared with a baseline of the same case, timer, device and run only
_CASE_KEY = [*POINT_KEY, "timer", "device_name", "run_id"]


def add_speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill ``speedup_vs_eager``/``speedup_vs_compile``: the baseline's ms_p50 over this point's, for the same
    case and timer. NaN unless both points are ``ok`` and timed (interpreter points never get one)."""
    out = frame.copy()
    timed = out["status"].eq("ok") & out["timer"].isin(SPEED_TIMERS) & (pd.to_numeric(out["ms_p50"]) > 0)
    for baseline, column in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
        base = out[timed & out["provider"].eq(baseline)][[*_CASE_KEY, "ms_p50"]]
        base = base.drop_duplicates(_CASE_KEY, keep="last").rename(columns={"ms_p50": "_base_ms"})
        merged = out[_CASE_KEY].merge(base, on=_CASE_KEY, how="left")
        ratio = merged["_base_ms"].to_numpy(dtype=np.float64) / pd.to_numeric(out["ms_p50"]).to_numpy(np.float64)
        out[column] = np.where(timed.to_numpy(), ratio, np.nan)
    return out


def results_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """Rows as a DataFrame with the schema's columns, in order (plus DIST_COLUMNS when the rows have them: a
    ``--world-size`` run), and speedups filled in."""
    extra = list(DIST_COLUMNS) if rows and DIST_COLUMNS[0] in rows[0] else []
    frame = pd.DataFrame(list(rows), columns=[*BENCH_COLUMNS, *extra])
    return add_speedups(frame) if len(frame) else frame


def run_sweep(
    cases: Sequence[Case],
    providers: Sequence[Provider],
    ctx: RunContext,
    *,
    done: Iterable[tuple] = (),
    measure: Callable[[Case, Provider, RunContext], list[PointResult]] | None = None,
    on_start: Callable[[Case, Provider], None] | None = None,
    on_point: Callable[[Case, Provider, list[PointResult]], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, list[float]]]:
    """Measure every point of :func:`plan_points` (minus ``done``) with ``measure`` (default
    :func:`measure_point`); returns the results frame
    and the raw samples by :func:`point_id`. ``on_start``/``on_point`` are called before and after each point
    (the CLI's progress bar and its rewrite of the results files)."""
    measure = measure or measure_point
    results: list[PointResult] = []
    for case, provider in plan_points(cases, providers, done):
        if on_start is not None:
            on_start(case, provider)
        got = measure(case, provider, ctx)
        results += got
        if on_point is not None:
            on_point(case, provider, got)
    return results_frame([r.row for r in results]), {point_id(r.row): r.samples_ms for r in results}
