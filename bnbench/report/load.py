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

import numpy as np
import pandas as pd

from bnbench.report.points import is_baseline
from bnbench.schema import validate_bench, validate_step, validate_train

__all__ = ["RESULTS_CSV", "RESULTS_JSON", "Result", "detect_kind", "load_result"]

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


def _check_quantiles(frame: pd.DataFrame, source: str) -> None:
    """Timed ok points must satisfy 0 < ms_p20 <= ms_p50 <= ms_p80 (the comparison's noise band relies on it)."""
    ok = frame[(frame["status"] == "ok") & (frame["timer"] != "interpreter")]
    p20, p50, p80 = (
        pd.to_numeric(ok[c], errors="coerce").to_numpy(dtype=float) for c in ("ms_p20", "ms_p50", "ms_p80")
    )
    if np.isnan(p50).any():
        raise ValueError(
            f"{source}: column ms_p50 is empty on {int(np.isnan(p50).sum())} timed point(s) with status ok"
        )
    for column, bad in (
        ("ms_p50", p50 <= 0),
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


def _read_csv(csv: Path) -> pd.DataFrame:
    try:
        header = pd.read_csv(csv, nrows=0)
        text = {c: str for c in _TEXT_COLUMNS if c in header.columns}
        frame = pd.read_csv(csv, dtype=text, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{csv}: the file is empty (no header)") from None
    except pd.errors.ParserError as err:
        raise ValueError(f"{csv}: not a valid CSV file ({err})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{csv}: not a text CSV file ({err})") from None
    return frame


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
    frame = _read_csv(csv)
    kind = detect_kind(frame, str(csv))
    if kind == "bench":
        validate_bench(frame, str(csv))
        try:
            is_baseline(frame["is_baseline"])
        except ValueError as err:
            raise ValueError(f"{csv}: {err}") from None
        _check_quantiles(frame, str(csv))
    elif kind == "step":
        validate_step(frame, str(csv))
    else:
        validate_train(frame, str(csv))
    return Result(path=folder, kind=kind, frame=frame, meta=_read_meta(folder / RESULTS_JSON))
