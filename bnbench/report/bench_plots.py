"""Figures of one benchmark run: time vs batch size, effective bandwidth vs bytes, speedup heatmaps.

Plot functions draw one panel on a given matplotlib ``ax`` and return it; :func:`bench_figures` lays panels out
on Figures built without pyplot (no global state). Only timed points (status ok, a real timer) are drawn.
Colours come from ``bnbench.report.style`` so a provider looks the same everywhere. Within one figure every
panel has the same axis kinds (log or linear, decided from all its panels' values), BatchNorm1d and
BatchNorm2d cases never share a batch axis (their panels are apart), and an axis swept over a few values is
labelled at exactly those values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from bnbench.report.points import device_label, geomean, is_baseline, timed_points
from bnbench.report.style import (
    DTYPE_ORDER,
    PASS_ORDER,
    PROVIDER_ORDER,
    color_for,
    new_figure,
    order_values,
    set_axis_scale,
    wants_log,
)

__all__ = ["bench_figures", "plot_bandwidth", "plot_speedup_heatmap", "plot_time_vs_batch"]

#: case dimensions that may vary inside one panel; when they do, each value gets its own line style
_EXTRA_DIMS = ("op", "activation", "bn_mode", "layout", "S", "timer")
#: display names of the ops in panel titles
_OP_NAMES = {"bn1d": "BN1d", "bn2d": "BN2d", "bn1d_add": "BN1d + add", "bn2d_add": "BN2d + add"}
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _varying(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if df[c].nunique(dropna=False) > 1]


def _varying_within(panels, columns: Sequence[str]) -> list[str]:
    """The ``columns`` that vary inside at least one panel (a dimension that differs only between panels is
    in their titles, not in every legend entry)."""
    return [c for c in columns if any(rows[c].nunique(dropna=False) > 1 for _, rows in panels)]


def style_order(frame: pd.DataFrame, extras: Sequence[str]) -> list[tuple]:
    """The combinations of ``extras`` values in ``frame``, in a stable order: a line's style is its index here.
    Compute it once per figure, so that a label has the same style in every panel (and in the legend)."""
    return order_values(tuple(r) for r in frame[list(extras)].astype(str).itertuples(index=False))


def _series(frame: pd.DataFrame, extras: Sequence[str], styles: Sequence[tuple] | None = None):
    """(provider, label, style index, rows) per line, in a stable order: provider order, then extra values.
    ``styles``: the figure's :func:`style_order` (default: this frame's)."""
    keys = ["provider", *extras]
    combos = list(styles) if styles is not None else style_order(frame, extras)
    for provider in order_values(frame["provider"], PROVIDER_ORDER):
        rows = frame[frame["provider"] == provider]
        for _, group in rows.groupby(keys, sort=True, dropna=False):
            extra = tuple(group[list(extras)].astype(str).iloc[0])
            detail = [f"{c}={v}" if c in ("S",) else v for c, v in zip(extras, extra, strict=True)]
            label = provider + (f" ({', '.join(detail)})" if detail else "")
            yield provider, label, combos.index(extra) if extras else 0, group


def _times(frame: pd.DataFrame) -> pd.Series:
    return pd.concat([frame["ms_p20"], frame["ms_p80"]])


def plot_time_vs_batch(ax, frame: pd.DataFrame, *, extras: Sequence[str] = (), title: str = "",
                       xlog: bool | None = None, ylog: bool | None = None,
                       styles: Sequence[tuple] | None = None):  # fmt: skip
    """Median time vs batch size N, one line per provider (and per value of ``extras``, styled by its index in
    ``styles``), p20-p80 band. Axes are log when asked (``xlog``/``ylog``; by default when this panel's values
    span a decade)."""
    for provider, label, style, group in _series(frame, extras, styles):
        group = group.sort_values("N")
        color = color_for(provider)
        ax.plot(group["N"], group["ms_p50"], color=color, marker=_MARKERS[style % len(_MARKERS)],
                linestyle=_LINESTYLES[style % len(_LINESTYLES)], label=label)  # fmt: skip
        ax.fill_between(group["N"], group["ms_p20"], group["ms_p80"], color=color, alpha=0.2, linewidth=0)
    set_axis_scale(ax, "x", wants_log(frame["N"]) if xlog is None else xlog, ticks=frame["N"])
    set_axis_scale(ax, "y", wants_log(_times(frame)) if ylog is None else ylog)
    ax.set_xlabel("batch size N")
    ax.set_ylabel("time (ms): median, band p20-p80")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    return ax


def plot_bandwidth(ax, frame: pd.DataFrame, *, copy_gbps: Sequence[float] = (), extras: Sequence[str] = (),
                   title: str = "", xlog: bool | None = None, styles: Sequence[tuple] | None = None):  # fmt: skip
    """Effective bandwidth (minimal bytes / median time) vs tensor bytes per provider; the p20-p80 band as error
    bars; a horizontal line at each measured copy bandwidth."""
    for provider, label, style, group in _series(frame, extras, styles):
        group = group.sort_values("bytes_min")
        gbps = group["gbps"].to_numpy(dtype=float)
        p50 = group["ms_p50"].to_numpy(dtype=float)
        low = gbps * p50 / group["ms_p80"].to_numpy(dtype=float)  # slower time, lower bandwidth
        high = gbps * p50 / group["ms_p20"].to_numpy(dtype=float)
        yerr = np.vstack([np.clip(gbps - low, 0, None), np.clip(high - gbps, 0, None)])
        ax.errorbar(group["bytes_min"], gbps, yerr=yerr, color=color_for(provider), label=label, capsize=2,
                    marker=_MARKERS[style % len(_MARKERS)], linestyle="none", markersize=4)  # fmt: skip
    for value in order_values(copy_gbps):
        ax.axhline(value, color="black", linestyle="--", linewidth=1, label=f"copy bandwidth {value:.3g} GB/s")
    set_axis_scale(ax, "x", wants_log(frame["bytes_min"]) if xlog is None else xlog, ticks=frame["bytes_min"])
    ax.set_xlabel("minimal bytes moved per call")
    ax.set_ylabel("effective bandwidth (GB/s)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    return ax


def speedup_grid(frame: pd.DataFrame, column: str) -> tuple[pd.DataFrame, int]:
    """Batch (rows) x width (columns) of the geometric-mean ``column``, and the most cases pooled in a cell."""
    values = frame.assign(_v=pd.to_numeric(frame[column], errors="coerce")).dropna(subset=["_v"])
    if values.empty:
        return pd.DataFrame(), 0
    grid = values.groupby(["N", "C"])["_v"].apply(geomean).unstack("C").sort_index().sort_index(axis=1)
    return grid, int(values.groupby(["N", "C"]).size().max())


def _log_span(values) -> float:
    """The largest |log(speedup)| among finite positive values, at least log(1.1) so 1.0 stays mid-scale."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return max(float(np.max(np.abs(np.log(arr)))) if arr.size else 0.0, float(np.log(1.1)))


def plot_speedup_heatmap(ax, frame: pd.DataFrame, column: str, *, title: str = "", limit: float | None = None):
    """Heatmap of ``column`` (a speedup) over batch size x width, centred on 1 on a log colour scale (green:
    faster than the baseline, red: slower) from 1/limit to limit (default: this panel's extremes; pass one
    limit to every panel of a figure so equal colours mean equal speedups); each cell is annotated."""
    grid, _ = speedup_grid(frame, column)
    if grid.empty:
        raise ValueError(f"no {column} values to plot")
    values = grid.to_numpy(dtype=float)
    span = float(np.log(limit)) if limit is not None else _log_span(values)
    if not span > 0:
        raise ValueError(f"limit must be > 1, got {limit}")
    norm = LogNorm(vmin=float(np.exp(-span)), vmax=float(np.exp(span)))
    ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", norm=norm, aspect="auto", origin="lower")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(n) for n in grid.index])
    ax.set_xlabel("width C")
    ax.set_ylabel("batch size N")
    ax.set_title(title)
    return ax


def _panels(frame: pd.DataFrame, keys: Sequence[str]):
    """(key values, rows) per panel, ordered by provider, dtype and pass order, then sorted values."""
    orders = {"provider": PROVIDER_ORDER, "dtype": DTYPE_ORDER, "pass": PASS_ORDER}
    ranks = {k: order_values(frame[k], orders.get(k, ())) for k in keys}
    groups = list(frame.groupby(list(keys), sort=False, dropna=False))

    def rank(key_values) -> tuple:
        return tuple(
            ranks[k].index(v) if v in ranks[k] else len(ranks[k]) for k, v in zip(keys, key_values, strict=True)
        )

    groups.sort(key=lambda kv: rank(kv[0]))
    return groups


def _legend(fig: Figure, axes) -> None:
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        longest = max(len(label) for label in handles)
        fit = int(fig.get_figwidth() * 72 / (6 * longest + 40))  # about 6 points per character at size 10
        fig.legend(
            list(handles.values()), list(handles), loc="outside lower center", ncols=max(1, min(len(handles), fit))
        )


def _op_name(op) -> str:
    return _OP_NAMES.get(str(op), str(op))


def _time_figure(timed: pd.DataFrame, device: str) -> Figure:
    panels = _panels(timed, ["op", "dtype", "pass", "C"])  # BN1d and BN2d get their own panels
    extras = _varying_within(panels, _EXTRA_DIMS)
    title = f"Time vs batch size on {device} (median; band p20-p80)"
    fig, axes = new_figure(len(panels), max_cols=max(1, min(timed["C"].nunique(), 4)), title=title)
    xlog, ylog = wants_log(timed["N"]), wants_log(_times(timed))
    styles = style_order(timed, extras)
    for ax, ((op, dtype, pass_, width), rows) in zip(axes, panels, strict=True):
        name = f"{_op_name(op)} · {dtype} · {pass_} · width C={width}"
        plot_time_vs_batch(ax, rows, extras=extras, title=name, xlog=xlog, ylog=ylog, styles=styles)
    _legend(fig, axes)
    return fig


def _bandwidth_figure(timed: pd.DataFrame, device: str) -> Figure | None:
    rows = timed.dropna(subset=["gbps", "bytes_min"])
    if rows.empty:
        return None
    panels = _panels(rows, ["dtype", "pass"])
    extras = _varying_within(panels, [c for c in _EXTRA_DIMS if c != "S"])
    fig, axes = new_figure(len(panels), title=f"Effective bandwidth vs bytes on {device}")
    xlog, styles = wants_log(rows["bytes_min"]), style_order(rows, extras)
    for ax, ((dtype, pass_), part) in zip(axes, panels, strict=True):
        copy = pd.to_numeric(part["peak_copy_gbps"], errors="coerce").dropna().unique()
        plot_bandwidth(ax, part, copy_gbps=list(copy), extras=extras, title=f"{dtype} · {pass_}", xlog=xlog,
                       styles=styles)  # fmt: skip
    _legend(fig, axes)
    return fig


def _heatmap_figure(timed: pd.DataFrame, column: str, baseline: str, device: str) -> Figure | None:
    candidates = timed[~is_baseline(timed["is_baseline"])]
    candidates = candidates[pd.to_numeric(candidates[column], errors="coerce").notna()]
    if candidates.empty:
        return None
    keys = ["provider", "dtype", "pass"] + [k for k in ("op", "timer") if candidates[k].nunique() > 1]
    panels = _panels(candidates, keys)
    title = f"Speedup over {baseline} on {device} (median times; > 1: faster)"
    fig, axes = new_figure(len(panels), title=title)
    grids = [speedup_grid(part, column)[0] for _, part in panels]
    limit = float(np.exp(_log_span(np.concatenate([g.to_numpy(dtype=float).ravel() for g in grids]))))
    for ax, (key, part) in zip(axes, panels, strict=True):
        _, pooled = speedup_grid(part, column)
        more = [_op_name(v) if k == "op" else str(v) for k, v in zip(keys[3:], key[3:], strict=True)]
        name = f"{key[0]} vs {baseline} · {key[1]} · {key[2]}" + "".join(f" · {v}" for v in more)
        if pooled > 1:
            name += f"\n(geomean of up to {pooled} cases per cell)"
        plot_speedup_heatmap(ax, part, column, title=name, limit=limit)
        image = ax.images[0]
        bar = fig.colorbar(image, ax=ax, label=f"speedup vs {baseline}")
        bar.minorticks_off()
        ticks = [image.norm.vmin, 1.0, image.norm.vmax]
        bar.set_ticks(ticks, labels=[f"{t:.2f}" for t in ticks])
    return fig


def bench_figures(df: pd.DataFrame) -> dict[str, Figure]:
    """Figures of one run, by file stem, only those with data: ``time_vs_batch``, ``bandwidth``,
    ``speedup_vs_eager``, ``speedup_vs_compile``. The caller saves (``bnbench._io.write_figure``) and owns them."""
    timed = timed_points(df)
    figures: dict[str, Figure] = {}
    if timed.empty:
        return figures
    device = device_label(timed)
    figures["time_vs_batch"] = _time_figure(timed, device)
    for stem, fig in (
        ("bandwidth", _bandwidth_figure(timed, device)),
        ("speedup_vs_eager", _heatmap_figure(timed, "speedup_vs_eager", "eager", device)),
        ("speedup_vs_compile", _heatmap_figure(timed, "speedup_vs_compile", "compile", device)),
    ):
        if fig is not None:
            figures[stem] = fig
    return figures
