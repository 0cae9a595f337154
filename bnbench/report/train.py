"""The training report: the verdict table, the figures and ``summary.md`` of a ``bnbench train`` results frame.

Contract used by the HTML report: :func:`verdict_table` (claim, measured, held: True/False/None) and
:func:`train_figures` (file stem -> Figure). Plot helpers take an ``ax`` and return it; colours per norm come
from :mod:`bnbench.report.style`. Nothing here reads or writes files.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bnbench.report.style import color_for, new_figure
from bnbench.report.verdicts import RUN_KEY, per_run, verdict_rows

__all__ = [
    "plot_curve",
    "plot_grad_norms",
    "plot_ics",
    "plot_lr_sweep",
    "plot_percentiles",
    "plot_vs_depth",
    "summary_markdown",
    "train_figures",
    "verdict_table",
]

_NORM_LABEL = {"none": "no BN", "eager": "BN (PyTorch)", "fused": "BN (bnbench fused)"}
_METRIC_LABEL = {"test_acc": "test accuracy", "train_loss": "training loss", "test_loss": "test loss"}


def verdict_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per claim the results can test: claim, source, experiment, measured, held, note."""
    return verdict_rows(df)


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
    """Steps to target, final test accuracy or saturated fraction against depth, per norm; mean over seeds with
    the seed range. For steps to target, runs that never reached it are drawn as an x above the plot area."""
    sub = df[df["activation"] == activation]
    if metric == "saturated":
        sat = sub[sub["metric"].str.startswith("saturated/")].assign(metric="saturated")
        runs = per_run(sat, "saturated", "mean_last")
    else:
        runs = per_run(sub, metric)
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
    ax.set_ylabel({"steps_to_target": "steps to target", "test_acc": "final test accuracy",
                   "saturated": "saturated fraction (end)"}.get(metric, metric))  # fmt: skip
    _legend(ax, "x-small")
    return ax


def plot_lr_sweep(ax, df: pd.DataFrame, activation: str):
    """Final test accuracy against the learning rate, per norm; diverged runs count as chance level."""
    sub = df[df["activation"] == activation]
    runs = per_run(sub, "test_acc")
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
    """Internal covariate shift per layer (Santurkar et al.): cosine or l2 difference, mean over steps and seeds."""
    sub = df[df["metric"].str.startswith(f"{kind}/")]
    sub = sub.assign(layer=sub["metric"].str.extract(r"layer(\d+)$")[0].astype(int))
    for norm, group in sub.groupby("norm", sort=False):
        mean = group.groupby("layer")["value"].mean()
        ax.plot(mean.index, mean.to_numpy(), marker="o", color=color_for(norm), label=_label(norm))
    if kind == "ics_l2":
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("cos(G, G') (1 = no shift)" if kind == "ics_cos" else "||G - G'||")
    _legend(ax, "small")
    return ax


def _curves_figure(df, title):
    fig, axes = new_figure(4, max_cols=2, title=title)
    for ax, (metric, x) in zip(axes, [("test_acc", "step"), ("train_loss", "step"), ("test_acc", "wall_s"),
                                      ("train_loss", "wall_s")], strict=True):  # fmt: skip
        plot_curve(ax, df, metric, x)
    return fig


def train_figures(df: pd.DataFrame) -> dict:
    """Every figure the frame supports, by file stem."""
    figures = {}
    paper = df[df["experiment"] == "bn-paper"]
    if len(paper):
        figures["bn_paper_curves"] = _curves_figure(paper, "bn-paper: 3x100 sigmoid MLP, with and without BN")
        norms = [
            n for n in dict.fromkeys(paper["norm"]) if paper[paper["norm"] == n]["metric"].str.startswith("pct").any()
        ]
        if norms:
            fig, axes = new_figure(len(norms), max_cols=len(norms), title="bn-paper: sigmoid input percentiles")
            for ax, norm in zip(axes, norms, strict=True):
                plot_percentiles(ax, paper, norm)
            figures["bn_paper_percentiles"] = fig
    depth = df[df["experiment"] == "depth"]
    if len(depth):
        acts = list(dict.fromkeys(depth["activation"]))
        fig, axes = new_figure(3 * len(acts), max_cols=len(acts), title="depth sweep (mean and seed range)")
        for i, metric in enumerate(("steps_to_target", "test_acc", "saturated")):
            for ax, act in zip(axes[i * len(acts) : (i + 1) * len(acts)], acts, strict=True):
                plot_vs_depth(ax, depth, act, metric)
        figures["depth_sweep"] = fig
        if depth["metric"].str.startswith("grad_norm/").any():
            deepest = int(depth["depth"].max())
            fig, axes = new_figure(len(acts), max_cols=len(acts), title="per-layer gradient norms, deepest network")
            for ax, act in zip(axes, acts, strict=True):
                plot_grad_norms(ax, depth, act, deepest)
            figures["depth_grad_norms"] = fig
    lr = df[df["experiment"] == "lr"]
    if len(lr):
        acts = list(dict.fromkeys(lr["activation"]))
        fig, axes = new_figure(len(acts), max_cols=len(acts), title="learning-rate sweep")
        for ax, act in zip(axes, acts, strict=True):
            plot_lr_sweep(ax, lr, act)
        figures["lr_sweep"] = fig
    ics = df[df["experiment"] == "ics"]
    if len(ics) and ics["metric"].str.startswith("ics_").any():
        fig, axes = new_figure(2, max_cols=2, title="internal covariate shift (Santurkar et al. 2018)")
        plot_ics(axes[0], ics, "ics_cos")
        plot_ics(axes[1], ics, "ics_l2")
        figures["ics"] = fig
    fused = df[df["experiment"] == "fused-vs-eager"]
    if len(fused):
        backend = ", ".join(sorted(set(fused.loc[fused["norm"] == "fused", "backend"]))) if "backend" in fused else "?"
        figures["fused_vs_eager_curves"] = _curves_figure(fused, f"fused vs eager BN (fused backend: {backend})")
    return figures


def _held_text(held) -> str:
    if held is None or (isinstance(held, float) and math.isnan(held)):
        return "inconclusive"
    return "yes" if held else "**no**"


def _md_table(frame: pd.DataFrame) -> str:
    cells = frame.astype(str).map(lambda s: s.replace("|", "\\|").replace("\n", " "))
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def _settings(df: pd.DataFrame, meta: dict) -> list[str]:
    lines = []
    for experiment, spec in (meta.get("specs") or {}).items():
        sub = df[df["experiment"] == experiment]
        backends = ", ".join(f"{n}={b}" for n, b in sub[["norm", "backend"]].drop_duplicates().itertuples(index=False)) \
            if "backend" in sub else "?"  # fmt: skip
        opt = spec.get("optimizer", "?")
        opt += f" (momentum {spec.get('momentum')})" if opt == "sgd" else ""
        lines.append(
            f"- **{experiment}**: {spec.get('dataset')}, model {'/'.join(spec.get('models', []))}, depth "
            f"{list(spec.get('depths', []))}, width {spec.get('width')}, activation "
            f"{'/'.join(spec.get('activations', []))}, batch {spec.get('batch_size')}, {spec.get('steps')} steps, "
            f"optimizer {opt}, learning rate {list(spec.get('lrs', []))}, init {spec.get('init')}"
            + (f" (std {spec.get('init_std')})" if spec.get("init") == "normal" else "")
            + f", target {spec.get('target_acc')}, seeds {sub['seed'].nunique()}; backends: {backends}"
        )
    return lines


def summary_markdown(df: pd.DataFrame, meta: dict | None = None) -> str:
    """``summary.md``: settings, the verdict table, plain statements of disagreement, and failures."""
    meta = meta or {}
    verdicts = verdict_table(df)
    experiments = ", ".join(dict.fromkeys(df["experiment"]))
    out = [f"# bnbench train: {experiments}", ""]
    header = [f"preset {meta['preset']}" if meta.get("preset") else "", f"device {meta['device']}" if
              meta.get("device") else "", f"git {meta.get('environment', {}).get('git_sha')}" if meta.get("environment")
              else ""]  # fmt: skip
    if any(header):
        out += [", ".join(h for h in header if h), ""]
    for name, description in (meta.get("datasets") or {}).items():
        out.append(f"Data `{name}`: {description}.")
    out += ["", "## Settings", "", *_settings(df, meta), ""]
    out += ["## Verdict", ""]
    if verdicts.empty:
        out.append("No claim could be tested from these results.")
    else:
        table = verdicts.assign(held=verdicts["held"].map(_held_text))[["claim", "measured", "held", "note"]]
        out.append(_md_table(table))
    out += ["", "## Where our numbers disagree", ""]
    failed = verdicts[verdicts["held"].map(lambda h: h is False or h is np.False_)]
    unsure = verdicts[verdicts["held"].map(lambda h: h is None)]
    for row in failed.itertuples():
        out.append(f'- Not confirmed here: "{row.claim}" ({row.source}). We measured {row.measured}.')
    for row in unsure.itertuples():
        out.append(f'- Inconclusive: "{row.claim}": {row.note}.')
    if failed.empty and unsure.empty:
        out.append("Every claim tested held in every seed (small data and few seeds: see the spread above).")
    out += ["", "Scale caveat: these runs use small data sets and few seeds; the paper's MNIST and ImageNet results "
            "come from far longer training.", ""]  # fmt: skip
    failures = meta.get("failures") or []
    if failures:
        out += ["## Failed runs", ""]
        out += [f"- {f['config'].get('experiment')} {f['config'].get('norm')} seed {f['config'].get('seed')}: "
                f"{f['error']}" for f in failures]  # fmt: skip
    runs = df[RUN_KEY].drop_duplicates()
    out += ["", f"{len(runs)} runs, {len(df)} measurement rows. Figures: the PNG files beside this summary.", ""]
    return "\n".join(out)
