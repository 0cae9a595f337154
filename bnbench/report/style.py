"""One look for every bnbench figure: a fixed colour per provider (and per training norm), the display order of
dtypes, passes and providers, and small helpers that build figures without pyplot's global state.

Every figure function in ``bnbench.report`` takes its colours from here, so "triton" is the same green in the
time plot, the bandwidth plot, the comparison plot and the training curves.
"""

from __future__ import annotations

import textwrap
import zlib
from collections.abc import Iterable

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "DTYPE_ORDER",
    "NORM_COLORS",
    "PASS_ORDER",
    "PROVIDER_COLORS",
    "PROVIDER_ORDER",
    "color_for",
    "compact_number",
    "maybe_log_scale",
    "new_figure",
    "order_values",
    "set_axis_scale",
    "wants_log",
]

#: benchmark providers (docs/measuring.md): the baselines and bnbench's fused kernels
PROVIDER_COLORS: dict[str, str] = {
    "eager": "#1f77b4",  # blue
    "compile": "#ff7f0e",  # orange
    "compile-max-autotune": "#8c564b",  # brown
    "triton": "#2ca02c",  # green
    "triton-compile": "#98df8a",  # light green: the fused layer under torch.compile
}
#: training runs: no normalisation, PyTorch's BatchNorm (eager), bnbench's fused layer (the triton kernels)
NORM_COLORS: dict[str, str] = {
    "none": "#7f7f7f",  # grey
    "eager": PROVIDER_COLORS["eager"],
    "fused": PROVIDER_COLORS["triton"],
}
#: colours for names not listed above, chosen by a stable hash of the name (never by call order), so an
#: unexpected provider still gets the same colour in every figure of every run
_EXTRA_COLORS = ("#d62728", "#9467bd", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939", "#843c39")

PROVIDER_ORDER = ("eager", "compile", "compile-max-autotune", "triton", "triton-compile")
DTYPE_ORDER = ("fp32", "float32", "tf32", "fp16", "float16", "bf16", "bfloat16")
PASS_ORDER = ("fwd", "bwd", "fwd_bwd", "eval")

#: size of one panel in inches
PANEL_SIZE = (4.6, 3.4)


def color_for(name: str) -> str:
    """The colour of a provider or training norm; the same name always gets the same colour."""
    if name in PROVIDER_COLORS:
        return PROVIDER_COLORS[name]
    if name in NORM_COLORS:
        return NORM_COLORS[name]
    return _EXTRA_COLORS[zlib.crc32(str(name).encode()) % len(_EXTRA_COLORS)]


def order_values(values: Iterable, order: Iterable = ()) -> list:
    """Distinct values, the ones named in ``order`` first (in that order), the rest sorted."""
    distinct = list(dict.fromkeys(v for v in values if v is not None and v == v))  # drop None and NaN
    order = list(order)
    known = [v for v in order if v in distinct]
    rest = sorted((v for v in distinct if v not in order), key=lambda v: (str(type(v)), v))
    return known + rest


def new_figure(n_panels: int, *, max_cols: int = 3, title: str = "") -> tuple[Figure, list]:
    """A Figure (no pyplot) with ``n_panels`` axes on a grid, flattened in reading order; extra cells are removed."""
    if n_panels < 1:
        raise ValueError(f"a figure needs at least one panel, got n_panels={n_panels}")
    ncols = min(n_panels, max_cols)
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.9), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n_panels:]:
        fig.delaxes(ax)
    if title:  # wrapped to the figure's width (about 7 points per character at the default size)
        fig.suptitle(textwrap.fill(title, max(20, int(fig.get_figwidth() * 72 / 7))))
    return fig, axes[:n_panels]


def _positive(values) -> np.ndarray:
    values = np.asarray(list(values), dtype=float)
    return values[np.isfinite(values) & (values > 0)]


def wants_log(values) -> bool:
    """Whether the positive ``values`` span a decade or more (sizes in a sweep usually do): decide it once per
    figure, from all its panels' values, so every panel of a figure has the same axis kind."""
    values = _positive(values)
    return bool(values.size and values.max() / values.min() >= 10)


def compact_number(value: float) -> str:
    """A short tick label: 256, 16384, 262k, 1.5M, 2G (decimal prefixes, for counts and bytes alike)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e5, "k")):
        if abs(value) >= scale:
            return f"{value / (1e3 if suffix == 'k' else scale):.3g}{suffix}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


#: at most this many data values are used as the ticks of an axis, and only when they are this far apart (a
#: fraction of the axis span; on a log axis, of its decades) so their labels cannot overlap
_MAX_DATA_TICKS = 8
_MIN_TICK_GAP = 0.18


def _spaced(values: list[float], log: bool) -> bool:
    if len(values) < 2:
        return True
    at = np.log10(values) if log else np.asarray(values)
    return bool(np.diff(at).min() >= _MIN_TICK_GAP * (at[-1] - at[0]))


def set_axis_scale(ax, axis: str, log: bool, ticks=None):
    """Set one axis's scale. With ``ticks`` (the data values, e.g. the batch sizes swept) and few of them, they
    become the only labelled ticks, in compact form (no crowded or overlapping minor labels on a log axis); a log
    axis without them labels only its decades."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log" if log else "linear")
    values = sorted(set(_positive(ticks))) if ticks is not None else []
    if 0 < len(values) <= _MAX_DATA_TICKS and _spaced(values, log):
        target.set_major_locator(FixedLocator(values))
        target.set_major_formatter(lambda v, _pos: compact_number(v))
        target.set_minor_locator(NullLocator())
    elif log:  # decades, plainly written; 1, 2 and 5 of each when the axis spans two decades or less
        span = np.log10(values[-1] / values[0]) if len(values) > 1 else 3.0
        target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if span <= 2 else (1.0,)))
        target.set_major_formatter(lambda v, _pos: compact_number(v))
        target.set_minor_formatter(NullFormatter())
    return ax


def maybe_log_scale(ax, values, axis: str = "x"):
    """Use a log axis when the positive ``values`` span a decade or more (one panel; see :func:`wants_log`)."""
    return set_axis_scale(ax, axis, wants_log(values))
