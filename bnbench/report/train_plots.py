"""Figures of the training experiments: each helper takes an ``ax`` and a results frame and returns the ax;
colours per norm come from :mod:`bnbench.report.style`. Curves and sweeps show the mean over seeds with the seed
range; :func:`plot_effects` shows the verdict table's effects with their 95% intervals.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bnbench.report.style import color_for
from bnbench.report.verdicts import per_run

__all__ = ["effect_panel", "plot_batch_size", "plot_curve", "plot_effects", "plot_grad_norms", "plot_ics", "plot_lr_sweep",
           "plot_matched_loss", "plot_percentiles", "plot_vs_depth"]  # fmt: skip

_NORM_LABEL = {"none": "no BN", "eager": "BN (PyTorch)", "fused": "BN (bnbench fused)", "noisy": "noisy BN",
               "layernorm": "LayerNorm", "groupnorm": "GroupNorm"}  # fmt: skip
_METRIC_LABEL = {"test_acc": "test accuracy", "train_loss": "training loss", "test_loss": "test loss"}


def _legend(ax, size: str) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty panel (no runs of that kind) gets no legend
        ax.legend(fontsize=size)


def _label(norm: str, model: str | None = None) -> str:
    return _NORM_LABEL.get(norm, norm) + (f", {model}" if model else "")


def plot_curve(ax, df: pd.DataFrame, metric: str, x: str = "step"):
    """``metric`` against steps or seconds (``x="wall_s"``), one line per norm (and model): the mean over seeds,
    with a band from the lowest to the highest seed."""
    sub = df[df["metric"] == metric]
    models = list(dict.fromkeys(sub["model"]))
    for (model, norm), group in sub.groupby(["model", "norm"], sort=False):
        stats = group.groupby("step").agg(lo=("value", "min"), hi=("value", "max"), mean=("value", "mean"),
                                          wall=("wall_s", "mean"))  # fmt: skip
        xs = stats.index.to_numpy() if x == "step" else stats["wall"].to_numpy()
        label = _label(norm, model if len(models) > 1 else None)
        style = "--" if len(models) > 1 and model != models[0] else "-"
        ax.plot(xs, stats["mean"], style, color=color_for(norm), label=label)
        ax.fill_between(xs, stats["lo"], stats["hi"], color=color_for(norm), alpha=0.2, linewidth=0)
    ax.set_xlabel("training steps" if x == "step" else "training time (s, evaluations excluded)")
    ax.set_ylabel(_METRIC_LABEL.get(metric, metric))
    if metric.endswith("loss"):
        ax.set_yscale("log")
    _legend(ax, "small")
    return ax


def plot_percentiles(ax, df: pd.DataFrame, norm: str):
    """The 15th/50th/85th percentiles of one last-hidden-layer unit's activation input over training (the
    paper's Figure 1b/c), mean over seeds."""
    sub = df[(df["norm"] == norm) & df["metric"].str.startswith("pct")]
    sub = sub.assign(p=sub["metric"].str.extract(r"^pct(\d+)/")[0].astype(int))
    wide = sub.groupby(["step", "p"])["value"].mean().unstack("p")
    color = color_for(norm)
    if {15, 85} <= set(wide.columns):
        ax.fill_between(wide.index, wide[15], wide[85], color=color, alpha=0.25, linewidth=0, label="15th-85th")
    for p in wide.columns:
        ax.plot(wide.index, wide[p], color=color, linewidth=2 if p == 50 else 1, label=f"{p}th")
    unit = sub["metric"].iloc[0].split("/", 1)[1] if len(sub) else ""
    ax.set_title(f"{_label(norm)}: input of sigmoid {unit}")
    ax.set_xlabel("training steps")
    ax.set_ylabel("activation input (test set, eval mode)")
    _legend(ax, "small")
    return ax


def plot_grad_norms(ax, df: pd.DataFrame, activation: str, depth: int):
    """Gradient norm of each layer's weight at step 0 (solid) and at the end (dashed), mean over seeds."""
    sub = df[(df["activation"] == activation) & (df["depth"] == depth) & df["metric"].str.startswith("grad_norm/")]
    sub = sub.assign(layer=sub["metric"].str.extract(r"layer(\d+)$")[0].astype(int))
    for norm, group in sub.groupby("norm", sort=False):
        last = group["step"].max()
        for step, style in ((0, "-"), (last, "--")):
            mean = group[group["step"] == step].groupby("layer")["value"].mean()
            ax.plot(mean.index, mean.to_numpy(), style, marker=".", color=color_for(norm),
                    label=f"{_label(norm)}, step {step}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_title(f"{activation}, depth {depth}")
    ax.set_xlabel(f"layer (1 = input side, {depth + 1} = output)")
    ax.set_ylabel("gradient norm of the weight")
    _legend(ax, "x-small")
    return ax


def plot_vs_depth(ax, df: pd.DataFrame, activation: str, metric: str):
    """Steps to target or final test accuracy against depth, per norm; mean over seeds with
    the seed range. For steps to target, runs that never reached it are drawn as an x above the plot area."""
    sub = df[df["activation"] == activation]
    runs = per_run(sub, metric, "tail" if metric == "test_acc" else "last")
    top = np.nanmax(runs["value"].to_numpy(dtype=float)) if runs["value"].notna().any() else 1.0
    for norm, group in runs.groupby("norm", sort=False):
        stats = group.groupby("depth")["value"].agg(["mean", "min", "max", "count"])
        never = group[group["value"].isna()].groupby("depth").size()
        ax.errorbar(stats.index, stats["mean"], yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]],
                    marker="o", capsize=3, color=color_for(norm), label=_label(norm))  # fmt: skip
        if metric == "steps_to_target" and len(never):
            ax.scatter(never.index, [top * 1.1] * len(never), marker="x", color=color_for(norm),
                       label=f"{_label(norm)}: never (some seeds)")  # fmt: skip
    ax.set_title(activation)
    ax.set_xlabel("depth (hidden layers)")
    ax.set_ylabel({"steps_to_target": "steps to target", "test_acc": "final test accuracy"}.get(metric, metric))
    _legend(ax, "x-small")
    return ax


def plot_lr_sweep(ax, df: pd.DataFrame, activation: str):
    """Final test accuracy against the learning rate, per norm; diverged runs count as chance level."""
    sub = df[df["activation"] == activation]
    runs = per_run(sub, "test_acc", "tail")
    runs = runs.assign(value=runs["value"].fillna(0.1))
    for norm, group in runs.groupby("norm", sort=False):
        stats = group.groupby("lr")["value"].agg(["mean", "min", "max"])
        ax.plot(stats.index, stats["mean"], marker="o", color=color_for(norm), label=_label(norm))
        ax.fill_between(stats.index, stats["min"], stats["max"], color=color_for(norm), alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.set_title(activation)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final test accuracy")
    _legend(ax, "small")
    return ax


def plot_ics(ax, df: pd.DataFrame, kind: str = "ics_cos"):
    """Internal covariate shift per layer (Santurkar et al.): ``ics_rel`` (||G - G'|| / ||G||), ``ics_cos`` or
    ``ics_l2``, mean over steps and seeds."""
    sub = df[df["metric"].str.startswith(f"{kind}/")]
    sub = sub.assign(layer=sub["metric"].str.extract(r"layer(\d+)$")[0].astype(int))
    for norm, group in sub.groupby("norm", sort=False):
        mean = group.groupby("layer")["value"].mean()
        ax.plot(mean.index, mean.to_numpy(), marker="o", color=color_for(norm), label=_label(norm))
    if kind != "ics_cos":
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel({"ics_cos": "cos(G, G') (1 = no shift)", "ics_rel": "||G - G'|| / ||G||"}.get(kind, "||G - G'||"))
    _legend(ax, "small")
    return ax


def plot_batch_size(ax, df: pd.DataFrame):
    """Final test accuracy against the batch size (equal epochs), per norm; BN also with batch statistics
    (train mode, dashed)."""
    runs = per_run(df, "test_acc", "tail")
    for norm, group in runs.groupby("norm", sort=False):
        stats = group.groupby("batch_size")["value"].agg(["mean", "min", "max"])
        ax.errorbar(stats.index, stats["mean"], yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]],
                    marker="o", capsize=3, color=color_for(norm), label=_label(norm))  # fmt: skip
    batch = per_run(df, "test_acc_batch")
    for norm, group in batch.groupby("norm", sort=False):
        mean = group.groupby("batch_size")["value"].mean()
        ax.plot(mean.index, mean.to_numpy(), "--", marker="x", color=color_for(norm),
                label=f"{_label(norm)}, batch statistics")  # fmt: skip
    ax.set_xscale("log")
    sizes = sorted(set(runs["batch_size"]))
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (equal epochs)")
    ax.set_ylabel("final test accuracy")
    _legend(ax, "x-small")
    return ax


def plot_matched_loss(ax, df: pd.DataFrame, weight_decay: float):
    """Test accuracy against the training loss (eval mode, a fixed training subset), per arm, mean over seeds:
    at any training loss, the higher curve generalises better."""
    sub = df[df["weight_decay"] == weight_decay] if "weight_decay" in df else df
    for (norm, dropout), group in sub.groupby(["norm", "dropout"], sort=False):
        wide = group[group["metric"].isin(("train_eval_loss", "test_acc"))].pivot_table(
            index=["seed", "step"], columns="metric", values="value").groupby("step").mean()  # fmt: skip
        if {"train_eval_loss", "test_acc"} <= set(wide.columns):
            label = _label(norm) + (f" + dropout {dropout:g}" if dropout else "")
            ax.plot(wide["train_eval_loss"], wide["test_acc"], "--" if dropout else "-", marker=".",
                    color=color_for(norm), label=label)  # fmt: skip
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_title(f"weight decay {weight_decay:g}")
    ax.set_xlabel("training loss (eval mode; decreasing to the right)")
    ax.set_ylabel("test accuracy")
    _legend(ax, "x-small")
    return ax


#: effect units -> the panel they share (effects in one panel are in one unit)
def effect_panel(unit: str) -> str:
    """The panel of an effect unit: accuracy differences share one, ratios one, log10 decades one."""
    if unit.startswith("(accuracy"):
        return "accuracy difference"
    if unit.startswith("x "):
        return "ratio (1 = no effect)"
    if unit.startswith("decades"):
        return "decades (log10; 0 = no effect)"
    return unit.strip("()")


def _short(row) -> str:
    parts = [p for p in row.setup.split(", ") if not p.startswith(("init", "SGD", "batch 60", "mlp", "cnn"))]
    detail = row.unit.split(",", 1)[1].strip(" )") if "," in row.unit else ""
    return f"{row.claim[:58]} [{', '.join(parts)[:56]}{'; ' + detail[:26] if detail else ''}]"


def plot_effects(ax, table: pd.DataFrame, panel: str):
    """The effects of the verdict rows in one :func:`effect_panel`: estimate and 95% interval per row, the
    no-effect value as a vertical line; colour by verdict."""
    rows = table[table["unit"].map(effect_panel).eq(panel) & table["estimate"].map(math.isfinite).astype(bool)]
    colors = {"holds": "#2ca02c", "opposite": "#d62728", "tie": "#7f7f7f", "inconclusive": "#ff7f0e"}
    for y, row in enumerate(rows.itertuples()):
        lo = row.low if math.isfinite(row.low) else row.estimate
        hi = row.high if math.isfinite(row.high) else row.estimate
        ax.errorbar([row.estimate], [y], xerr=[[row.estimate - lo], [hi - row.estimate]], fmt="o", capsize=3,
                    color=colors.get(row.verdict, "black"))  # fmt: skip
    null = float(rows["null"].iloc[0]) if len(rows) else 0.0
    ax.axvline(null, color="black", linewidth=0.8)
    if null == 1.0 and len(rows) and rows[["low", "estimate"]].min(axis=None) > 0:
        ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), [_short(r) for r in rows.itertuples()], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_title(panel, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return ax
