"""Selections and labels over a bench results frame (columns ``bnbench.schema.BENCH_COLUMNS``).

Speed tables and plots use only *timed* points: ``status == "ok"`` and a real timer. Points timed by the Triton
interpreter are correctness checks (the interpreter simulates the kernel in numpy), so their times mean nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bnbench import schema
from bnbench.report.style import DTYPE_ORDER, PASS_ORDER, PROVIDER_ORDER, order_values

__all__ = [
    "CASE_COLUMNS",
    "POINT_KEY",
    "case_label",
    "device_label",
    "geomean",
    "is_baseline",
    "sort_points",
    "timed_points",
]

#: the columns that describe a case in tables (docs/measuring.md); ``shape`` is included because N, C, S do not
#: fix H and W
CASE_COLUMNS = ("op", "pass", "activation", "bn_mode", "dtype", "layout", "N", "C", "S", "shape")
#: one point = case x provider x timer: the schema's key (``bnbench.schema.POINT_KEY``) plus bn_mode, N, C, S,
#: which follow from it and are matched along so that a comparison keeps them for its labels
POINT_KEY = (*schema.POINT_KEY, "bn_mode", "N", "C", "S", "provider", "timer")


def timed_points(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that belong in speed tables and plots: status ok, timed by a real timer (not the interpreter)."""
    return df[(df["status"] == "ok") & (df["timer"] != "interpreter")]


def is_baseline(values: pd.Series) -> pd.Series:
    """The ``is_baseline`` column as booleans, whether the CSV stored True/False, 1/0 or 'true'/'false'."""
    if pd.api.types.is_bool_dtype(values):
        return values.astype(bool)
    text = values.astype(str).str.strip().str.lower()
    known = text.isin(["true", "1", "1.0", "false", "0", "0.0"])
    if not known.all():
        bad = sorted(set(values[~known].astype(str)))
        raise ValueError(f"column is_baseline has value(s) {bad}; expected true/false")
    return text.isin(["true", "1", "1.0"])


def geomean(values) -> float:
    """Geometric mean of the finite positive values (NaN when there are none)."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return float(np.exp(np.log(arr).mean())) if arr.size else float("nan")


def case_label(df: pd.DataFrame) -> pd.Series:
    """A short readable name per row: ``fwd fp32 256x1024 relu train contiguous``."""
    shape = df["shape"].astype(object).where(df["shape"].notna(), None)
    fallback = df["N"].astype(str) + "x" + df["C"].astype(str) + "x" + df["S"].astype(str)
    shape = shape.where(shape.notna(), fallback).astype(str)
    parts = [df["pass"].astype(str), df["dtype"].astype(str), shape, df["activation"].astype(str)]
    parts += [df["bn_mode"].astype(str), df["layout"].astype(str)]
    label = parts[0]
    for part in parts[1:]:
        label = label + " " + part
    return label


def device_label(df: pd.DataFrame) -> str:
    """The device(s) a frame was measured on, for titles."""
    names = order_values(df["device_name"].dropna().astype(str))
    return ", ".join(names) if names else "unknown device"


def _rank(values: pd.Series, order) -> pd.Series:
    ranks = {v: i for i, v in enumerate(order_values(values, order))}
    return values.map(ranks)


def sort_points(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in reading order: dtype, pass, provider (known names first), then sizes."""
    if df.empty:
        return df
    keys = pd.DataFrame(
        {
            "_dtype": _rank(df["dtype"], DTYPE_ORDER),
            "_pass": _rank(df["pass"], PASS_ORDER),
            "_provider": _rank(df["provider"], PROVIDER_ORDER),
        },
        index=df.index,
    )
    extra = [c for c in ("N", "C", "S") if c in df.columns]
    order = pd.concat([keys, df[extra]], axis=1).sort_values([*keys.columns, *extra], kind="stable").index
    return df.loc[order]
