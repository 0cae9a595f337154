"""Results schemas: the columns every bench, step and train CSV carries (defined in docs/measuring.md), the key that
names a point, the dtype names, and their validation.

The harness and the training experiments write these files; reports only read them. A file that does not fit
raises ValueError naming the file and the column.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "BENCH_COLUMNS",
    "BENCH_STATUSES",
    "BENCH_TIMERS",
    "DIST_COLUMNS",
    "DTYPES",
    "DTYPE_ALIASES",
    "ELEMENT_SIZE",
    "POINT_KEY",
    "STEP_COLUMNS",
    "STEP_TIMERS",
    "TRAIN_COLUMNS",
    "torch_dtype",
    "validate_bench",
    "validate_step",
    "validate_train",
]

#: the results' dtype names -> torch dtype attribute names (resolved by :func:`torch_dtype`, so this module
#: imports no torch)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: other spellings the CLI accepts for them
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
#: bytes per element of each dtype
ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


def torch_dtype(name: str):
    """The torch dtype of a results dtype name (``"bf16"`` -> ``torch.bfloat16``); ValueError for others."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid dtypes are: {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


#: one row per point = case x provider x timer; floats unrounded
BENCH_COLUMNS: tuple[str, ...] = (
    # provenance
    "run_id", "timestamp_utc", "git_sha", "bnbench_version", "torch_version", "triton_version", "device_name",
    "peak_copy_gbps",
    # case
    "op", "pass", "activation", "bn_mode", "dtype", "layout", "N", "C", "S", "shape", "numel",
    # provider
    "provider", "is_baseline", "kernel_config",
    # method
    "timer", "n_samples",
    # statistics (milliseconds)
    "ms_p20", "ms_p50", "ms_p80",
    # derived
    "bytes_min", "gbps", "frac_of_copy_bw", "speedup_vs_eager", "speedup_vs_compile", "compile_s", "peak_mem_mb",
    # correctness and status ("message" says why a point is not ok)
    "max_rel_err", "status", "message",
)  # fmt: skip

#: the columns that name a case in a results file; with ``provider`` they name a point (what --resume skips),
#: with ``timer`` too a row's raw samples
POINT_KEY: tuple[str, ...] = ("op", "pass", "activation", "dtype", "layout", "shape")

#: columns a ``--world-size`` benchmark adds to BENCH_COLUMNS: who measured, over how many ranks, and the
#: collectives' share of a call
DIST_COLUMNS: tuple[str, ...] = ("rank", "world_size", "dist_backend", "collective_ms_p50", "collective_share")

BENCH_STATUSES = ("ok", "incorrect", "error", "skipped", "oom")
#: cuda_event: triton.testing.do_bench; cuda_graph: CUDA-graph replay; wall: CPU wall clock;
#: interpreter: Triton interpreter (correctness only, never in a speed table)
BENCH_TIMERS = ("cuda_event", "cuda_graph", "wall", "interpreter")
_BENCH_NUMERIC = ("N", "C", "S", "numel", "n_samples", "ms_p20", "ms_p50", "ms_p80", "bytes_min", "gbps")

#: long format: one row per (run, step, metric)
TRAIN_COLUMNS: tuple[str, ...] = (
    "experiment", "dataset", "model", "depth", "width", "activation", "norm", "lr", "batch_size", "seed",
    "step", "wall_s", "metric", "value",
)  # fmt: skip


#: ``bnbench step``: one row per training-step configuration x provider (columns in bnbench/step/measure.py)
STEP_COLUMNS: tuple[str, ...] = (
    # provenance
    "run_id", "timestamp_utc", "git_sha", "bnbench_version", "torch_version", "triton_version", "device_name",
    # case: the network, its definition's source (torchvision | bnbench), batch, input resolution, precision
    # (fp32 | bf16, the latter under torch.autocast), layout (nchw | channels_last)
    "model", "network_source", "batch", "resolution", "dtype", "autocast", "layout",
    # provider; fused_backend: triton | torch ("" when nothing is fused); BatchNorm layers fused and left alone
    "provider", "is_baseline", "fused_backend", "bn_layers", "bn_fused", "bn_unfused", "bn_unfused_reasons",
    # method: wall (synchronised wall clock per step) | interpreter (correctness only)
    "timer", "n_samples", "warmup_steps",
    # statistics (milliseconds per step) and derived figures
    "ms_p20", "ms_p50", "ms_p80", "images_per_s", "speedup_vs_eager", "speedup_vs_compile", "compile_s",
    "peak_mem_mb", "bn_act_ms", "bn_act_share",
    # correctness after one step: relative errors vs the same network in float64, the eager network's own
    # gradient error (the precision's rounding, as amplified by the network) and the bound applied
    "loss", "loss_rel_err", "grad_rel_err", "eager_grad_rel_err", "tolerance", "status", "message",
)  # fmt: skip
STEP_TIMERS = ("wall", "interpreter")
_STEP_NUMERIC = ("batch", "resolution", "n_samples", "ms_p20", "ms_p50", "ms_p80", "images_per_s", "compile_s",
                 "peak_mem_mb", "bn_act_share", "loss_rel_err", "grad_rel_err")  # fmt: skip


def _require(frame: pd.DataFrame, columns: tuple[str, ...], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}")


def validate_bench(frame: pd.DataFrame, source: str = "bench results") -> pd.DataFrame:
    """Check a bench results frame; return it. Raises ValueError naming ``source`` and the bad column: missing
    columns, unknown statuses or timers, non-numeric numbers, times that are not finite and > 0 ms, and timed ok
    points whose quantiles are not ordered (0 < ms_p20 <= ms_p50 <= ms_p80)."""
    _require(frame, BENCH_COLUMNS, source)
    bad = sorted(set(frame["status"].dropna()) - set(BENCH_STATUSES))
    if bad:
        raise ValueError(f"{source}: column status has unknown value(s) {bad}; expected {BENCH_STATUSES}")
    bad = sorted(set(frame["timer"].dropna()) - set(BENCH_TIMERS))
    if bad:
        raise ValueError(f"{source}: column timer has unknown value(s) {bad}; expected {BENCH_TIMERS}")
    for column in _BENCH_NUMERIC:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) and values.notna().any():
            raise ValueError(f"{source}: column {column} must be numeric, got dtype {values.dtype}")
    _check_times(frame, source)
    return frame


def _check_times(frame: pd.DataFrame, source: str) -> None:
    """Every recorded time is a finite positive number of milliseconds, and timed ok points satisfy
    0 < ms_p20 <= ms_p50 <= ms_p80 (the comparison's noise band relies on it)."""
    for column in ("ms_p20", "ms_p50", "ms_p80"):
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isnan(values) & ~(np.isfinite(values) & (values > 0))
        if bad.any():
            i = int(np.argmax(bad))
            row = frame.iloc[i]
            raise ValueError(
                f"{source}: column {column} must be a finite time > 0 ms, got {row[column]} on {int(bad.sum())} "
                f"row(s), e.g. line {i + 2} (provider={row['provider']} shape={row['shape']})"
            )
    ok = frame[(frame["status"] == "ok") & (frame["timer"] != "interpreter")]
    p20, p50, p80 = (
        pd.to_numeric(ok[c], errors="coerce").to_numpy(dtype=float) for c in ("ms_p20", "ms_p50", "ms_p80")
    )
    if np.isnan(p50).any():
        raise ValueError(
            f"{source}: column ms_p50 is empty on {int(np.isnan(p50).sum())} timed point(s) with status ok"
        )
    for column, bad in (
        ("ms_p20", p20 > p50 * (1 + 1e-9)),
        ("ms_p80", p80 < p50 * (1 - 1e-9)),
    ):
        if bad.any():
            row = ok.iloc[int(np.argmax(bad))]
            raise ValueError(
                f"{source}: column {column} breaks 0 < ms_p20 <= ms_p50 <= ms_p80 on {int(bad.sum())} row(s), e.g. "
                f"provider={row['provider']} shape={row['shape']} (p20={row['ms_p20']}, p50={row['ms_p50']}, "
                f"p80={row['ms_p80']})"
            )


def validate_step(frame: pd.DataFrame, source: str = "step results") -> pd.DataFrame:
    """Check a ``bnbench step`` results frame; return it. Raises ValueError naming ``source`` and the column."""
    _require(frame, STEP_COLUMNS, source)
    for column, valid in (("status", BENCH_STATUSES), ("timer", STEP_TIMERS)):
        bad = sorted(set(frame[column].dropna()) - set(valid))
        if bad:
            raise ValueError(f"{source}: column {column} has unknown value(s) {bad}; expected {valid}")
    for column in _STEP_NUMERIC:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) and values.notna().any():
            raise ValueError(f"{source}: column {column} must be numeric, got dtype {values.dtype}")
    return frame


def validate_train(frame: pd.DataFrame, source: str = "train results") -> pd.DataFrame:
    """Check a training results frame; return it. Raises ValueError naming ``source`` and the bad column."""
    _require(frame, TRAIN_COLUMNS, source)
    for column in ("step", "value"):
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise ValueError(f"{source}: column {column} must be numeric, got dtype {frame[column].dtype}")
    return frame
