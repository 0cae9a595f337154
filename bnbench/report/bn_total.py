"""The call-weighted BatchNorm + activation time of one training step of a network, from a bench results frame
and the network's BN call table (``results.json`` key ``model_bn_calls``, see :mod:`bnbench.bench.model_cases`).

For each batch, dtype, layout, pass, provider and timer: the sum over the network's distinct BN calls of
``count x ms_p50`` of that call's case. With pass ``fwd_bwd`` this is the BatchNorm + activation work of one
training step (forward and backward of every BN layer): what a user of that network saves. A total is left empty
(NaN) when any call's case has no timed ok point for that provider: a partial sum is never shown as a total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from bnbench.report.document import Section, Table, Text
from bnbench.report.points import timed_points

#: timers whose numbers are speeds (the interpreter's are not)
SPEED_TIMERS = ("cuda_event", "cuda_graph", "wall")

__all__ = ["bn_total_sections", "call_weighted_totals"]

_GROUP = ["N", "dtype", "layout", "pass", "provider", "timer"]
COLUMNS = [*_GROUP, "bn_calls", "shapes", "shapes_measured", "ms_per_step", "speedup_vs_eager", "speedup_vs_compile"]


def _sample_shape(shape: pd.Series) -> pd.Series:
    return shape.astype(str).str.split("x", n=1).str[1]


def call_weighted_totals(frame: pd.DataFrame, calls: Sequence[Mapping]) -> pd.DataFrame:
    """One row per (N, dtype, layout, pass, provider, timer) of the frame's points that belong to the network:
    the number of BN calls, distinct call shapes and how many were measured, the weighted total (ms per step),
    and its speedups over eager's and compile's totals of the same group. Pure: reads nothing."""
    if not calls:
        raise ValueError("no BN calls given: the network's call table is empty")
    counts = {(c["op"], c["activation"], str(c["sample_shape"])): int(c["count"]) for c in calls}
    df = frame.assign(sample_shape=_sample_shape(frame["shape"]))
    mine = df[[k in counts for k in zip(df["op"], df["activation"], df["sample_shape"], strict=True)]]
    if mine.empty:
        return pd.DataFrame(columns=COLUMNS)
    timed = timed_points(mine)
    key_columns = ["op", "activation", "sample_shape", "layout", "N", "dtype", "pass", "provider", "timer"]
    ms = {
        tuple(key): float(value) for *key, value in timed[[*key_columns, "ms_p50"]].itertuples(index=False, name=None)
    }
    is_2d = mine["op"].astype(str).str.startswith("bn2d")  # bn2d, and bn2d_add (with the residual add)
    layouts = set(mine.loc[is_2d, "layout"]) or {"nchw"}
    rows = []
    groups = mine[is_2d] if is_2d.any() else mine
    groups = groups[groups["timer"].isin(SPEED_TIMERS)]  # interpreter and skipped points are never timed
    for N, dtype, layout, pass_, provider, timer in groups[_GROUP].drop_duplicates().itertuples(index=False):
        if layout not in layouts:
            continue
        total, measured = 0.0, 0
        for (op, act, sample), count in counts.items():
            lay = "nchw" if op.startswith("bn1d") else layout
            value = ms.get((op, act, sample, lay, N, dtype, pass_, provider, timer))
            if value is not None:
                total, measured = total + count * value, measured + 1
        rows.append({"N": N, "dtype": dtype, "layout": layout, "pass": pass_, "provider": provider, "timer": timer,
                     "bn_calls": sum(counts.values()), "shapes": len(counts), "shapes_measured": measured,
                     "ms_per_step": total if measured == len(counts) else np.nan})  # fmt: skip
    out = pd.DataFrame(rows, columns=COLUMNS[:-2])
    for baseline, column in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
        base = out[out["provider"] == baseline].set_index(["N", "dtype", "layout", "pass", "timer"])["ms_per_step"]
        keys = pd.MultiIndex.from_frame(out[["N", "dtype", "layout", "pass", "timer"]])
        out[column] = base.reindex(keys).to_numpy(dtype=float) / out["ms_per_step"].to_numpy(dtype=float)
    return out


def bn_total_sections(frame: pd.DataFrame, model_calls: Mapping | None, *, level: int = 2) -> list[Section]:
    """The summary's section for a run whose cases came from a network (none when ``model_calls`` is None)."""
    if not model_calls:
        return []
    totals = call_weighted_totals(frame, model_calls["calls"])
    n_calls = sum(int(c["count"]) for c in model_calls["calls"])
    text = Text(
        f"{model_calls['model']} ({model_calls.get('source', '?')} definition, {model_calls.get('resolution', '?')}px "
        f"input): {n_calls} BatchNorm calls per forward pass in {len(model_calls['calls'])} distinct shapes. "
        "ms_per_step = sum over the calls of count x the median time of the call's case; for pass fwd_bwd that "
        "is the BatchNorm + activation time of one training step. Empty when a call's case was not measured ok "
        "(shapes_measured < shapes). Speedups: eager's (compile's) total over this provider's, same group."
    )  # fmt: skip
    order = {"fwd_bwd": 0, "fwd": 1, "bwd": 2, "eval": 3}
    if len(totals):
        totals = totals.sort_values(["pass", "dtype", "layout", "N"], key=lambda s: s.map(order) if s.name == "pass" else s,
                                    kind="stable")  # fmt: skip
    return [
        Section(
            "BN + activation time per training step (call-weighted)",
            [text, Table(totals.reset_index(drop=True))],
            level,
        )
    ]
