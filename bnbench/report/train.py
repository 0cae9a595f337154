"""The training report: the verdict table, the figures and ``summary.md`` of a ``bnbench train`` results frame.

Contract used by the HTML report: :func:`verdict_table` (claim, measured, held: True/False/None, and the effect
columns) and :func:`train_figures` (file stem -> Figure). Plot helpers are in :mod:`bnbench.report.train_plots`.
Nothing here reads or writes files.
"""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure

from bnbench.report import train_plots as tp
from bnbench.report.style import new_figure
from bnbench.report.verdicts import AT_CHANCE, TAIL, best_rates, run_key, verdict_rows

__all__ = ["summary_markdown", "train_figures", "verdict_table"]

#: PyTorch's BatchNorm defaults, which every BN arm uses (the summary states them)
BN_MOMENTUM, BN_EPS = 0.1, 1e-5


def verdict_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per claim and set-up the results can test (columns :data:`bnbench.report.verdicts.COLUMNS`:
    claim, set-up, effect with its 95% interval, verdict, held True/False/None, what the paper says, note)."""
    return verdict_rows(df)


def _curves_figure(df, title):
    fig, axes = new_figure(4, max_cols=2, title=title)
    for ax, (metric, x) in zip(axes, [("test_acc", "step"), ("train_loss", "step"), ("test_acc", "wall_s"),
                                      ("train_loss", "wall_s")], strict=True):  # fmt: skip
        tp.plot_curve(ax, df, metric, x)
    return fig


def _at_plain_best_rate(sub: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs of an experiment at the plain network's best learning rate (every norm), and that rate."""
    if sub["lr"].nunique() < 2 or "none" not in set(sub["norm"]):
        return sub, f"lr {sub['lr'].iloc[0]:g}"
    rate = best_rates(sub)[0].get("none", sorted(set(sub["lr"]))[0])
    return sub[sub["lr"] == rate], f"lr {rate:g}, the plain net's best"


def _effects_figure(table: pd.DataFrame) -> Figure | None:
    """Every effect with its 95% interval: one panel per kind of unit, stacked, each as tall as its rows."""
    if table.empty:
        return None
    finite = table[table["estimate"].map(math.isfinite).astype(bool)]
    panels = list(dict.fromkeys(finite["unit"].map(tp.effect_panel)))
    if not panels:
        return None
    sizes = [int((finite["unit"].map(tp.effect_panel) == p).sum()) for p in panels]
    fig = Figure(figsize=(11, 1.0 + 0.28 * sum(sizes) + 0.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=[n + 1.5 for n in sizes])[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        tp.plot_effects(ax, finite, panel)
    fig.suptitle("effect sizes with 95% intervals (paired by seed): green holds, red opposite, orange "
                 "inconclusive, grey tie")  # fmt: skip
    return fig


def train_figures(df: pd.DataFrame) -> dict:
    """Every figure the frame supports, by file stem."""
    figures = {}
    for experiment, title in (("bn-paper", "bn-paper: 3x100 sigmoid MLP"), ("paper-literal", "paper-literal: "
                              "the paper's set-up as written"), ("cnn", "cnn"), ("santurkar", "santurkar: noisy BN")):  # fmt: skip
        sub = df[df["experiment"] == experiment]
        if len(sub):
            for dataset, one in sub.groupby("dataset", sort=False):
                one, rate = _at_plain_best_rate(one)
                stem = f"{experiment.replace('-', '_')}_curves" + (
                    f"_{dataset}" if sub["dataset"].nunique() > 1 else ""
                )
                figures[stem.replace("-", "_")] = _curves_figure(one, f"{title}, {dataset}, {rate}")
            norms = [
                n for n in dict.fromkeys(sub["norm"]) if sub[sub["norm"] == n]["metric"].str.startswith("pct").any()
            ]
            if norms:
                one, rate = _at_plain_best_rate(sub)
                fig, axes = new_figure(len(norms), max_cols=len(norms), title=f"{experiment}: sigmoid input "
                                       f"percentiles (Figure 1), {rate}")  # fmt: skip
                for ax, norm in zip(axes, norms, strict=True):
                    tp.plot_percentiles(ax, one, norm)
                figures[f"{experiment.replace('-', '_')}_percentiles"] = fig
    depth = df[df["experiment"] == "depth"]
    if len(depth):
        acts = list(dict.fromkeys(depth["activation"]))
        fig, axes = new_figure(2 * len(acts), max_cols=len(acts), title="depth sweep (mean and seed range)")
        for i, metric in enumerate(("steps_to_target", "test_acc")):
            for ax, act in zip(axes[i * len(acts) : (i + 1) * len(acts)], acts, strict=True):
                tp.plot_vs_depth(ax, depth, act, metric)
        figures["depth_sweep"] = fig
        if depth["metric"].str.startswith("grad_norm/").any():
            deepest = int(depth["depth"].max())
            fig, axes = new_figure(len(acts), max_cols=len(acts), title="per-layer gradient norms, deepest network")
            for ax, act in zip(axes, acts, strict=True):
                tp.plot_grad_norms(ax, depth, act, deepest)
            figures["depth_grad_norms"] = fig
    sweeps = df[df["experiment"].isin(("lr", "bn-paper")) & (df.groupby("experiment")["lr"].transform("nunique") > 2)]
    if len(sweeps):
        panels = list(sweeps.groupby(["experiment", "dataset", "activation"], sort=False))
        fig, axes = new_figure(len(panels), max_cols=3, title="learning-rate sweeps")
        for ax, ((experiment, dataset, act), one) in zip(axes, panels, strict=True):
            tp.plot_lr_sweep(ax, one, act)
            ax.set_title(f"{experiment}: {dataset}, {act}")
        figures["lr_sweep"] = fig
    ics = df[df["experiment"] == "ics"]
    if len(ics) and ics["metric"].str.startswith("ics_").any():
        fig, axes = new_figure(2, max_cols=2, title="internal covariate shift (Santurkar et al. 2018)")
        tp.plot_ics(axes[0], ics, "ics_rel")
        tp.plot_ics(axes[1], ics, "ics_cos")
        figures["ics"] = fig
    reg = df[df["experiment"] == "regularization"]
    if len(reg) and "weight_decay" in reg:
        wds = sorted(set(reg["weight_decay"]))
        fig, axes = new_figure(len(wds), max_cols=2, title="regularisation: test accuracy at matched training loss")
        for ax, wd in zip(axes, wds, strict=True):
            tp.plot_matched_loss(ax, reg, wd)
        figures["regularization"] = fig
    batch = df[df["experiment"] == "batch-size"]
    if len(batch):
        fig, axes = new_figure(1, title="batch size (equal epochs)")
        tp.plot_batch_size(axes[0], batch)
        figures["batch_size"] = fig
    fused = df[df["experiment"] == "fused-vs-eager"]
    if len(fused):
        backend = ", ".join(sorted(set(fused.loc[fused["norm"] == "fused", "backend"]))) if "backend" in fused else "?"
        figures["fused_vs_eager_curves"] = _curves_figure(fused, f"fused vs eager BN (fused backend: {backend})")
    effects = _effects_figure(verdict_table(df))
    if effects is not None:
        figures["effects"] = effects
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


def _list(values) -> str:
    values = list(values) if isinstance(values, list | tuple) else [values]
    return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _settings(df: pd.DataFrame, meta: dict) -> list[str]:
    lines = []
    for experiment, spec in (meta.get("specs") or {}).items():
        sub = df[df["experiment"] == experiment]
        backends = ", ".join(f"{n}={b}" for n, b in sub[["norm", "backend"]].drop_duplicates().itertuples(index=False)) \
            if "backend" in sub else "?"  # fmt: skip
        opt = spec.get("optimizer", "?")
        opt += f" (momentum {spec.get('momentum')})" if opt == "sgd" else ""
        if spec.get("epochs"):
            steps = ", ".join(f"{s} at batch {b}" for b, s in sub.groupby("batch_size")["step"].max().items())
            length = f"{spec['epochs']:g} epochs ({steps} steps)"
        else:
            length = f"{spec.get('steps')} steps"
        init = spec.get("init") + {
            "normal": f" (N(0, {spec.get('init_std')}^2))",
            "auto": " (He for relu, Glorot for sigmoid/tanh)",
        }.get(spec.get("init"), "")
        extra = f", noise {spec.get('noise')}" if spec.get("noise") else ""
        target = spec.get("target_acc")
        target = ", ".join(f"{k} {v:g}" for k, v in target.items()) if isinstance(target, dict) else f"{target:g}"
        every = spec.get("eval_every")
        schedule = (f"evaluations at 0, the powers of 4 below {every}, then every {every} steps" if every else
                    "about 10 evaluations per run, plus early ones at powers of 4")  # fmt: skip
        probes = ["test loss, train-set accuracy and loss", *(spec.get("probes") or ())]
        probes += ["test accuracy with batch statistics"] if spec.get("train_mode_eval") else []
        lines.append(
            f"- **{experiment}**: data {_list(spec.get('datasets', []))}; model {_list(spec.get('models', []))}, "
            f"depth {_list(spec.get('depths', []))}, width {spec.get('width')}, activation "
            f"{_list(spec.get('activations', []))}; norms {_list(spec.get('norms', []))}{extra}; batch "
            f"{_list(spec.get('batch_sizes', []))}; {length}; {schedule}; optimizer {opt}, learning rate "
            f"{_list(spec.get('lrs', []))} (constant: no schedule), weight decay {_list(spec.get('weight_decays', []))}"
            f", dropout {_list(spec.get('dropouts', []))}; init {init}; every {spec.get('probe_every')} steps and at "
            f"the end: {', '.join(probes)}"
            + (f" (ics/smoothness every {spec['ics_every']} steps)" if spec.get("ics_every") else "")
            + f"; target test accuracy {target}; seeds {sub['seed'].nunique()}; backends: {backends}"
        )
    return lines


def summary_markdown(df: pd.DataFrame, meta: dict | None = None) -> str:
    """``summary.md``: every setting, the per-claim table, plain statements of disagreement, and failures."""
    meta = meta or {}
    verdicts = verdict_table(df)
    experiments = ", ".join(dict.fromkeys(df["experiment"]))
    env = meta.get("environment") or {}
    out = [f"# bnbench train: {experiments}", ""]
    header = [f"preset {meta['preset']}" if meta.get("preset") else "", f"device {meta['device']}" if
              meta.get("device") else "", f"commit {env.get('git_sha')}" if env else "",
              f"torch {env.get('torch_version')}" if env else "", f"{meta['threads']} CPU thread(s)" if
              meta.get("threads") else ""]  # fmt: skip
    if any(header):
        out += [", ".join(h for h in header if h), ""]
    if meta.get("command"):
        out += [f"Command: `bnbench {' '.join(map(str, meta['command'][1:]))}`", ""]
    for name, description in (meta.get("datasets") or {}).items():
        out.append(f"- Data `{name}`: {description}.")
    out += [
        "", "## Method", "",
        "- Arms are paired by seed: same seed, same initial weights (drawn in an order that does not depend on the "
        "arm) and the same mini-batch order; the arms of one configuration and seed run back to back (interleaved "
        "run order), so they see the same machine load.",
        "- Effect = mean paired difference over seeds with a two-sided 95% Student t interval. A claim **holds** "
        "only when the interval excludes no effect; **opposite** when it excludes it on the other side; **tie** "
        "when every paired difference is exactly 0; **inconclusive** otherwise, or when an arm did not learn "
        f"(final accuracy below {AT_CHANCE}, chance being 0.1).",
        f"- Final accuracy = mean test accuracy over the last {TAIL} evaluations. Steps to target are "
        "interpolated between evaluations (log-spaced early evaluations); a run that never reaches the target "
        "counts as its length (a bound). Learning rates are chosen on the validation split (never on test).",
        "- Fair baselines: with a rate sweep every comparison appears twice: both arms at the plain network's best "
        "rate (the paper's like-for-like comparison) and each arm at its own best rate.",
        f"- BatchNorm: PyTorch's defaults in every BN arm (momentum {BN_MOMENTUM}, eps {BN_EPS}); "
        "evaluation in eval mode (running statistics) unless the row says batch statistics.",
        "", "## Settings", "", *_settings(df, meta), "",
    ]  # fmt: skip
    out += ["## Verdict per claim", ""]
    if verdicts.empty:
        out.append("No claim could be tested from these results.")
    else:
        table = verdicts[["claim", "setup", "effect", "verdict", "paper", "measured", "note"]]
        out.append(_md_table(table.rename(columns={"setup": "set-up", "effect": "effect (95% CI)",
                                                   "paper": "the paper / source says"})))  # fmt: skip
        counts = verdicts["verdict"].value_counts()
        out += ["", "Verdicts: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in ("holds", "opposite", "tie",
                                                                                     "inconclusive")) + "."]  # fmt: skip
    out += ["", "## Where our numbers disagree with the paper or the source", ""]
    disagree = verdicts[verdicts["verdict"] != "holds"]
    for row in disagree.itertuples():
        says = f" ({row.paper})" if row.paper else ""
        out.append(f'- "{row.claim}" ({row.source}){says}: **{row.verdict}** in {row.setup}: {row.effect}. '
                   f"{row.measured}." + (f" {row.note}." if row.note else ""))  # fmt: skip
    if disagree.empty:
        out.append("Every claim tested held.")
    out += ["", "Scale caveat: small data sets (thousands of images), small networks and a few thousand steps; the "
            "paper's MNIST run took 50000 steps and its ImageNet results come from far longer training.", ""]  # fmt: skip
    failures = meta.get("failures") or []
    if failures:
        out += ["## Failed runs", ""]
        out += [f"- {f['config'].get('experiment')} {f['config'].get('norm')} seed {f['config'].get('seed')}: "
                f"{f['error']}" for f in failures]  # fmt: skip
    runs = df[run_key(df)].drop_duplicates()
    out += ["", f"{len(runs)} runs, {len(df)} measurement rows. Figures: the PNG files beside this summary.", ""]
    return "\n".join(out)
