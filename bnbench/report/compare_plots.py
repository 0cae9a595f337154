"""The comparison figure: candidate / baseline time ratio per point, with its noise band and the threshold.

``plot_ratio`` draws one panel on a given ``ax`` and returns it; ``compare_figures`` lays out one panel per dtype
and pass on a Figure built without pyplot.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bnbench.report.compare import TIMED_LABELS
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

__all__ = ["compare_figures", "plot_ratio"]


def plot_ratio(ax, rows: pd.DataFrame, *, threshold: float, title: str = "", xlog: bool | None = None,
               ylog: bool | None = None):  # fmt: skip
    """Time ratio (candidate / baseline; > 1 slower) against tensor size, one colour per provider, error bars
    from the noise band; regressions ringed in red; dotted lines at 1 +- threshold. Axes are log when asked
    (by default when this panel's values span a decade)."""
    for provider in order_values(rows["provider"], PROVIDER_ORDER):
        part = rows[rows["provider"] == provider].sort_values("numel")
        ratio = part["ratio"].to_numpy(dtype=float)
        yerr = np.vstack([np.clip(ratio - part["ratio_lo"].to_numpy(dtype=float), 0, None),
                          np.clip(part["ratio_hi"].to_numpy(dtype=float) - ratio, 0, None)])  # fmt: skip
        ax.errorbar(part["numel"], ratio, yerr=yerr, color=color_for(provider), marker="o", linestyle="none",
                    markersize=4, capsize=2, label=provider)  # fmt: skip
    bad = rows[rows["regression"]]
    if len(bad):
        ax.scatter(bad["numel"], bad["ratio"], s=120, facecolors="none", edgecolors="red", label="regression")
    ax.axhline(1.0, color="black", linewidth=1)
    for level in (1 + threshold, 1 / (1 + threshold)):
        ax.axhline(level, color="grey", linestyle=":", linewidth=1)
    set_axis_scale(ax, "x", wants_log(rows["numel"]) if xlog is None else xlog, ticks=rows["numel"])
    set_axis_scale(ax, "y", wants_log(_band(rows)) if ylog is None else ylog)
    ax.set_xlabel("elements in the input tensor")
    ax.set_ylabel("time ratio candidate / baseline")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    return ax


def _band(rows: pd.DataFrame) -> pd.Series:
    return pd.concat([rows["ratio_lo"], rows["ratio_hi"]])


def compare_figures(comparison: pd.DataFrame, *, threshold: float, title: str = "") -> dict[str, Figure]:
    """``{"compare_ratio": Figure}`` when some point was timed in both runs, else ``{}``."""
    rows = comparison[comparison["label"].isin(TIMED_LABELS) & comparison["ratio"].notna()]
    if rows.empty:
        return {}
    panels = [
        ((dtype, pass_), rows[(rows["dtype"] == dtype) & (rows["pass"] == pass_)])
        for dtype in order_values(rows["dtype"], DTYPE_ORDER)
        for pass_ in order_values(rows["pass"], PASS_ORDER)
    ]
    panels = [(key, part) for key, part in panels if len(part)]
    heading = title or "Candidate vs baseline"
    fig, axes = new_figure(len(panels), title=f"{heading}: time ratio (median; band from p20/p80)")
    xlog, ylog = wants_log(rows["numel"]), wants_log(_band(rows))  # one axis kind for every panel
    for ax, ((dtype, pass_), part) in zip(axes, panels, strict=True):
        plot_ratio(ax, part, threshold=threshold, title=f"{dtype} · {pass_}", xlog=xlog, ylog=ylog)
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 5))
    return {"compare_ratio": fig}
