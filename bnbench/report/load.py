"""Read result folders (the only module of ``bnbench.report`` that reads files) and validate them.

A result folder holds ``results.csv`` (bench or train schema, see ``bnbench.schema``), optionally ``results.json``
(the sidecar: environment and raw samples), figures and ``summary.md``. The folder's kind is read off the CSV's
columns; the frame is validated with ``validate_bench`` / ``validate_train``. Every error names the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bnbench import _io
from bnbench.report.points import is_baseline
from bnbench.schema import validate_bench, validate_step, validate_train

__all__ = [
    "RESULTS_CSV",
    "RESULTS_JSON",
    "Result",
    "committed_roots",
    "detect_kind",
    "load_result",
    "newest_gpu_reference",
]

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
#: columns read as text even when every value looks like a number (a commit like 1234567, a run id)
_TEXT_COLUMNS = (
    "run_id", "timestamp_utc", "git_sha", "bnbench_version", "torch_version", "triton_version", "device_name",
    "op", "pass", "activation", "bn_mode", "dtype", "layout", "shape", "provider", "kernel_config", "timer",
    "status", "message", "experiment", "dataset", "model", "norm", "metric", "network_source", "fused_backend",
    "bn_unfused_reasons",
)  # fmt: skip


@dataclass(frozen=True)
class Result:
    """One loaded result folder: its kind ("bench" or "train"), the validated frame and the sidecar dict."""

    path: Path
    kind: str
    frame: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.resolve().name


def detect_kind(frame: pd.DataFrame, source: str) -> str:
    """ "step" for ``bnbench step`` results (a network per row), "bench" when the frame has per-point timing
    columns, "train" when it has the long metric/value columns."""
    columns = set(frame.columns)
    if {"model", "images_per_s", "ms_p50"} <= columns:
        return "step"
    if {"provider", "ms_p50"} <= columns:
        return "bench"
    if {"metric", "value", "step"} <= columns:
        return "train"
    raise ValueError(
        f"{source}: neither a bench results file (needs columns provider, ms_p50, ...) nor a train results file "
        f"(needs columns step, metric, value, ...); found columns {sorted(columns)}"
    )


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load_result(path: str | os.PathLike) -> Result:
    """Load and validate a result folder (or its ``results.csv``). Raises FileNotFoundError when there is no
    results.csv, ValueError naming the file and column when the content does not fit the schema."""
    path = Path(path)
    folder, csv = (path.parent, path) if path.suffix == ".csv" else (path, path / RESULTS_CSV)
    if not csv.is_file():
        raise FileNotFoundError(f"{path}: no {RESULTS_CSV} here (is it a bench or train result folder?)")
    frame = _io.read_csv(csv, text_columns=_TEXT_COLUMNS)
    kind = detect_kind(frame, str(csv))
    if kind == "bench":
        validate_bench(frame, str(csv))
        try:
            is_baseline(frame["is_baseline"])
        except ValueError as err:
            raise ValueError(f"{csv}: {err}") from None
    elif kind == "step":
        validate_step(frame, str(csv))
    else:
        validate_train(frame, str(csv))
    return Result(path=folder, kind=kind, frame=frame, meta=_read_meta(folder / RESULTS_JSON))


#: timers that only a GPU run has
_GPU_TIMERS = ("cuda_event", "cuda_graph")


def committed_roots() -> list[Path]:
    """Where committed results live: ``reports/`` under the working directory and under the checkout bnbench
    runs from (an editable install), each once."""
    checkout = Path(__file__).resolve().parents[2] / "reports"
    roots = [Path("reports").resolve(), checkout]
    return [r for r in dict.fromkeys(roots) if r.is_dir()]


def newest_gpu_reference(roots: list[Path] | None = None):
    """The newest bench results under ``roots`` (default :func:`committed_roots`) timed on a GPU, as a
    ``bnbench.report.scope.GpuReference`` quoting its headline (the fused providers' rows), or None when there is none. A folder that does not load is
    skipped: committed results are quoted here, not validated (``bnbench report`` on it says what is wrong)."""
    from bnbench.report.bench import headline_table
    from bnbench.report.scope import GpuReference

    best = None
    for root in committed_roots() if roots is None else roots:
        for csv in sorted(Path(root).glob(f"**/{RESULTS_CSV}")):
            try:
                result = load_result(csv)
            except (ValueError, OSError):
                continue
            frame = result.frame
            if result.kind != "bench" or not frame["timer"].isin(_GPU_TIMERS).any():
                continue
            gpu = frame[frame["timer"].isin(_GPU_TIMERS)]
            date = str(gpu["timestamp_utc"].dropna().max()) if gpu["timestamp_utc"].notna().any() else ""
            if best is None or date > best.date:
                devices = ", ".join(str(v) for v in dict.fromkeys(gpu["device_name"].dropna())) or "unknown GPU"
                head = headline_table(gpu)
                best = GpuReference(str(result.path), devices, date, head[head["provider"] != "eager"])
    return best
