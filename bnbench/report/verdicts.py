"""Each claim about BatchNorm, tested against the measurements: one row per claim, set-up and comparison, with
a paired effect size, its 95% interval and a verdict (:mod:`bnbench.report.effects`). Everything is computed
from the long results frame; nothing is hard-coded. The claims of later work and bnbench's own are in
:mod:`bnbench.report.verdicts_beyond`.

Rules shared by every claim:
- Arms are paired by seed within one configuration; "BN" is PyTorch's BatchNorm (``eager``), or the fused
  layer when no eager run exists.
- Final accuracy is the mean over a run's last :data:`TAIL` evaluations (one evaluation is noisy).
- Fair baselines: with a learning-rate sweep, each comparison is made at the plain network's best rate for both
  arms ("same rate": BN added to a tuned baseline, the paper's 2.3x comparison) and with each arm at its own best
  rate ("best rates"); best means the highest mean final validation accuracy over seeds (test accuracy when a
  run has no validation split, which the set-up column then says).
- Steps to target are interpolated between evaluations; a run that never reaches the target counts as its
  length (a lower bound on its steps, so an advantage computed from it is a lower bound too).
- An arm whose final accuracy is below :data:`AT_CHANCE` has not learned: claims about how it trains are then
  inconclusive, never evidence.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bnbench.report.effects import HELD, Effect, decide, one_sample, paired

__all__ = ["AT_CHANCE", "COLUMNS", "RUN_KEY", "TAIL", "best_rates", "claim_row", "per_run", "run_key", "verdict_rows"]

RUN_KEY = ["experiment", "dataset", "model", "depth", "width", "activation", "norm", "lr", "batch_size", "seed"]
#: settings written beside RUN_KEY that also tell runs apart (see bnbench.train.loop.ARM_COLUMNS)
_ARM_COLUMNS = ("init", "optimizer", "momentum", "weight_decay", "dropout", "noise")
#: final accuracy = mean over the last TAIL evaluations
TAIL = 3
#: 10 classes: chance is 0.1; below this final accuracy an arm has not learned
AT_CHANCE = 0.2
COLUMNS = ["claim", "source", "experiment", "setup", "paper", "measured", "effect", "estimate", "low", "high", "null",
           "unit", "n", "verdict", "held", "note"]  # fmt: skip


def run_key(df: pd.DataFrame) -> list[str]:
    """The columns that identify one run in ``df``: RUN_KEY plus the arm settings present."""
    return RUN_KEY + [c for c in _ARM_COLUMNS if c in df.columns]


def per_run(df: pd.DataFrame, metric: str, how: str = "last") -> pd.DataFrame:
    """One row per run: its key, ``step`` (the last step of the metric) and ``value``: the metric at the run's
    last step (``last``), its mean over all rows (``mean``), over the rows of the last step (``mean_last``, e.g.
    over layers), or over the last :data:`TAIL` steps (``tail``)."""
    key = run_key(df)
    sub = df[df["metric"] == metric]
    if sub.empty:
        return pd.DataFrame(columns=[*key, "step", "value"])
    last = sub.groupby(key, dropna=False)["step"].transform("max")
    if how == "tail":
        ranks = sub.groupby(key, dropna=False)["step"].rank(method="dense", ascending=False)
        sub = sub[ranks <= TAIL]
    elif how in ("last", "mean_last"):
        sub = sub[sub["step"] == last]
    elif how != "mean":
        raise ValueError(f"unknown aggregation {how!r}")
    sub = sub.assign(step=last[sub.index])
    return sub.groupby([*key, "step"], dropna=False, sort=False)["value"].mean().reset_index()


def _bn_norm(norms) -> str | None:
    norms = set(norms)
    return "eager" if "eager" in norms else ("fused" if "fused" in norms else None)


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.3g}"


def _effect_text(effect: Effect, unit: str) -> str:
    if effect.n == 0:
        return "no pairs"
    text = f"{_fmt(effect.estimate)} {unit}".strip()
    if effect.n >= 2 and math.isfinite(effect.low):
        text += f" (95% CI {_fmt(effect.low)} to {_fmt(effect.high)})"
    return text + f", n={effect.n}"


def _spread(values) -> str:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "none"
    return f"{v.mean():.3g}" + (f" [{v.min():.3g}, {v.max():.3g}]" if v.size > 1 else "")


def claim_row(claim: str, source: str, experiment: str, setup: str, effect: Effect, *, unit: str, verdict: str,
              measured: str, paper: str = "", note: str = "", null: float = 0.0) -> dict:  # fmt: skip
    """One verdict row (see :data:`COLUMNS`). ``effect`` is in display units; ``null`` is its no-effect value."""
    return {"claim": claim, "source": source, "experiment": experiment, "setup": setup, "paper": paper,
            "measured": measured, "effect": _effect_text(effect, unit), "estimate": effect.estimate,
            "low": effect.low, "high": effect.high, "null": null, "unit": unit, "n": effect.n, "verdict": verdict,
            "held": HELD[verdict], "note": note}  # fmt: skip


def _groups(sub: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """The configurations of one experiment apart from norm, lr and seed: (settings, rows) pairs."""
    cols = [c for c in run_key(sub) if c not in ("norm", "lr", "seed", "experiment")]
    return [(dict(zip(cols, k, strict=True)), g) for k, g in sub.groupby(cols, dropna=False, sort=False)]


def _setup(g: dict, extra: str = "") -> str:
    text = f"{g['dataset']}, {g['model']} {g['depth']}x{g['width']} {g['activation']}, batch {g['batch_size']}"
    if "init" in g:
        text += f", init {g['init']}"
    if g.get("optimizer") == "sgd":
        text += f", SGD momentum {g['momentum']}" if "momentum" in g else ", SGD"
    return text + (f", {extra}" if extra else "")


def _arms(runs: pd.DataFrame, rates: dict[str, float]) -> pd.DataFrame:
    """Values by seed (rows) and norm (columns), each norm at its rate in ``rates``."""
    keep = runs[runs["lr"] == runs["norm"].map(rates)]
    return keep.pivot_table(index="seed", columns="norm", values="value", aggfunc="mean", dropna=False)


def best_rates(group: pd.DataFrame) -> tuple[dict[str, float], str]:
    """Each norm's best learning rate (highest mean final validation accuracy over seeds) and what chose it."""
    metric = "val_acc" if (group["metric"] == "val_acc").any() else "test_acc"
    score = per_run(group, metric, "tail").groupby(["norm", "lr"])["value"].mean().reset_index()
    best = {}
    for norm, one in score.groupby("norm"):
        best[norm] = float(one.sort_values(["value", "lr"], ascending=[False, True])["lr"].iloc[0])
    return best, "validation" if metric == "val_acc" else "test"


def _modes(group: pd.DataFrame, bn: str) -> list[tuple[str, dict[str, float]]]:
    """The comparisons a group supports: at the plain network's best rate, and (with a sweep) at each best."""
    rates = sorted(set(group["lr"]))
    best, chooser = best_rates(group)
    if len(rates) == 1 or "none" not in best or bn not in best:
        return [(f"lr {rates[0]:g}" if len(rates) == 1 else "same rate", {"none": rates[0], bn: rates[0]})]
    same = best["none"]
    return [(f"same rate {same:g} (the plain net's best on {chooser})", {"none": same, bn: same}),
            (f"best rates (no BN {best['none']:g}, BN {best[bn]:g}, chosen on {chooser})",
             {"none": best["none"], bn: best[bn]})]  # fmt: skip


def _at_chance(acc: pd.DataFrame, *norms: str) -> list[str]:
    return [n for n in norms if n in acc and acc[n].mean() < AT_CHANCE]


def _fair_claims(sub: pd.DataFrame, experiment: str, source: str, paper_steps: str, paper_acc: str) -> list[dict]:
    """Fewer steps and higher accuracy, per configuration, at the same rate and at the best rates."""
    rows = []
    bn = _bn_norm(sub["norm"])
    if bn is None or "none" not in set(sub["norm"]):
        return rows
    for g, group in _groups(sub):
        target = per_run(group, "target_acc")["value"]
        target_text = f"{target.iloc[0]:.0%}" if len(target) else "target"
        steps = per_run(group, "steps_to_target")
        censored = steps["value"].isna()
        steps = steps.assign(value=steps["value"].where(~censored, steps["step"]))
        acc_runs = per_run(group, "test_acc", "tail")
        for mode, rates in _modes(group, bn):
            setup = _setup(g, mode)
            acc = _arms(acc_runs, rates)
            lost = _at_chance(acc, "none", bn)
            s = _arms(steps, rates)
            if {"none", bn} <= set(s.columns):
                cens = _arms(steps.assign(value=censored.astype(float)), rates)
                log_ratio = paired(np.log(s["none"]), np.log(s[bn]))
                verdict = decide(log_ratio)
                note = ""
                if (cens.get("none", 0) > 0).any() or (cens.get(bn, 0) > 0).any():
                    note = (f"runs that never reached {target_text} count as their length (no BN: "
                            f"{int(cens.get('none', pd.Series()).sum())}, BN: {int(cens.get(bn, pd.Series()).sum())} "
                            "runs): the ratio is a bound")  # fmt: skip
                if len(lost) == 2 or (cens.min().min() > 0):
                    verdict, note = "inconclusive", "neither arm learned / reached the target: nothing to compare"
                rows.append(claim_row(
                    "BN trains in fewer steps", source, experiment, setup, log_ratio.scaled(math.exp),
                    unit="x (steps no BN / BN)", verdict=verdict, null=1.0, paper=paper_steps, note=note,
                    measured=f"steps to {target_text} test accuracy: BN {_spread(s[bn])}; no BN {_spread(s['none'])}",
                ))  # fmt: skip
            if {"none", bn} <= set(acc.columns):
                diff = paired(acc[bn], acc["none"])
                verdict = "inconclusive" if len(lost) == 2 else decide(diff)
                rows.append(claim_row(
                    "BN reaches a higher test accuracy", source, experiment, setup, diff, unit="(accuracy, BN - no BN)",
                    verdict=verdict, paper=paper_acc,
                    measured=f"final test accuracy (mean of last {TAIL} evaluations): BN {_spread(acc[bn])}; no BN "
                    f"{_spread(acc['none'])}",
                    note="both arms at chance" if len(lost) == 2 else "",
                ))  # fmt: skip
    return rows


def _largest_rate(sub: pd.DataFrame, source: str, experiment: str) -> list[dict]:
    """The largest rate of the sweep that reaches the target without diverging, per seed: log10 BN / no BN."""
    rows = []
    bn = _bn_norm(sub["norm"])
    if bn is None:
        return rows
    for g, group in _groups(sub):
        rates = sorted(set(group["lr"]))
        if len(rates) < 3:
            continue
        ok = per_run(group, "reached_target").merge(per_run(group, "diverged"), on=[*run_key(group), "step"])
        ok = ok[(ok["value_x"] >= 1) & (ok["value_y"] < 1)]
        largest = ok.groupby(["seed", "norm"])["lr"].max().unstack("norm").reindex(sorted(set(group["seed"])))
        largest = largest.reindex(columns=[bn, "none"])
        diff = paired(np.log10(largest[bn]), np.log10(largest["none"]))
        missing = int(largest[[bn, "none"]].isna().any(axis=1).sum())
        rows.append(claim_row(
            "BN tolerates higher learning rates", source, experiment, _setup(g, f"rates {rates}"), diff,
            unit="decades (log10 largest rate, BN - no BN)", verdict=decide(diff),
            paper="BN allows higher learning rates (the paper's BN-x5, BN-x30 on ImageNet)",
            measured=f"largest rate reaching the target: BN {_spread(largest[bn])}; no BN {_spread(largest['none'])}",
            note=f"{missing} seed(s) where an arm trained at no rate were left out" if missing else "",
        ))  # fmt: skip
    return rows


def _percentile_drift(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: mean over p in (15, 50, 85) of range(pct_p over steps > 0) / mean(pct85 - pct15)."""
    key = run_key(df)
    sub = df[df["metric"].str.startswith("pct") & (df["step"] > 0)]
    if sub.empty:
        return pd.DataFrame(columns=[*key, "value"])
    sub = sub.assign(p=sub["metric"].str.extract(r"^pct(\d+)/")[0].astype(int))
    rows = []
    for k, run in sub.groupby(key, dropna=False, sort=False):
        wide = run.pivot_table(index="step", columns="p", values="value")
        if not {15, 85} <= set(wide.columns):
            continue
        width = (wide[85] - wide[15]).mean()
        span = (wide.max() - wide.min()).mean()
        rows.append({**dict(zip(key, k, strict=True)), "value": span / width if width > 0 else math.nan})
    return pd.DataFrame(rows, columns=[*key, "value"])


def _stability(sub: pd.DataFrame, experiment: str) -> list[dict]:
    rows = []
    bn = _bn_norm(sub["norm"])
    drift = _percentile_drift(sub)
    if bn is None or drift.empty:
        return rows
    for g, group in _groups(sub):
        mode, rates = _modes(group, bn)[0]
        d = _arms(drift.merge(group[run_key(group)].drop_duplicates(), on=run_key(group)), rates)
        if {"none", bn} <= set(d.columns):
            diff = paired(d["none"], d[bn])
            rows.append(claim_row(
                "BN keeps a layer's input distribution stable (Figure 1)", "paper", experiment, _setup(g, mode), diff,
                unit="(drift, no BN - BN)", verdict=decide(diff),
                paper="with BN the 15/50/85th percentiles of a last-layer sigmoid input stay stable; without, they move",
                measured=f"drift of those percentiles (their range over training / mean 15-85 band): BN "
                f"{_spread(d[bn])}; no BN {_spread(d['none'])}",
            ))  # fmt: skip
    return rows


def _log_grad_ratio(one: pd.DataFrame, depth: int) -> pd.DataFrame:
    """Per run at step 0: log10(||grad W_1|| / ||grad W_depth||) (layer 1 = input side)."""
    first = per_run(one[one["step"] == 0], "grad_norm/layer1")
    last = per_run(one[one["step"] == 0], f"grad_norm/layer{depth}")
    ratio = first.merge(last, on=run_key(one))
    return ratio.assign(value=np.log10(ratio["value_x"] / ratio["value_y"]))


def _depth(df: pd.DataFrame) -> list[dict]:
    sub = df[df["experiment"] == "depth"]
    rows = []
    bn = _bn_norm(sub["norm"])
    if sub.empty or bn is None or "none" not in set(sub["norm"]):
        return rows
    for act in sorted(set(sub["activation"])):
        one = sub[(sub["activation"] == act)]
        deepest = int(one["depth"].max())
        deep = one[one["depth"] == deepest]
        g = {"dataset": deep["dataset"].iloc[0], "model": "mlp", "depth": deepest, "width": int(deep["width"].iloc[0]),
             "activation": act, "batch_size": int(deep["batch_size"].iloc[0])}  # fmt: skip
        acc_runs = per_run(deep, "test_acc", "tail")
        reached = per_run(one, "reached_target")
        for mode, rates in _modes(deep, bn):
            acc = _arms(acc_runs, rates)
            ok = reached[reached["lr"] == reached["norm"].map(rates)]
            ok = ok.groupby(["norm", "depth"])["value"].min()
            trainable = {n: max([d for (m, d), v in ok.items() if m == n and v >= 1], default=0) for n in ("none", bn)}
            if not {"none", bn} <= set(acc.columns):
                continue
            diff = paired(acc[bn], acc["none"])
            lost = _at_chance(acc, "none", bn)
            rows.append(claim_row(
                f"BN lets deep {act} networks train", "paper, seed article", "depth", _setup(g, mode), diff,
                unit="(accuracy, BN - no BN)", verdict="inconclusive" if len(lost) == 2 else decide(diff),
                paper="BN makes deep networks with saturating activations trainable",
                measured=f"final test accuracy at depth {deepest}: BN {_spread(acc[bn])}; no BN {_spread(acc['none'])}; "
                f"deepest depth of {sorted(set(one['depth']))} where every seed reaches the target: BN "
                f"{trainable[bn] or 'none'}, no BN {trainable['none'] or 'none'}",
                note="both arms at chance: train longer" if len(lost) == 2 else "",
            ))  # fmt: skip
        first = sorted(set(deep["lr"]))[0]  # the gradient at step 0 does not depend on the rate
        ratio = _arms(_log_grad_ratio(deep, deepest), {"none": first, bn: first})
        if {"none", bn} <= set(ratio.columns):
            rows += _gradient_rows(act, _setup(g, "step 0"), ratio, bn, deepest)
    return rows


def _gradient_rows(act: str, setup: str, ratio: pd.DataFrame, bn: str, depth: int) -> list[dict]:
    """Vanishing and exploding gradients at initialisation, scored apart (the size of the log ratio)."""
    rows = []
    plain, normed = ratio["none"], ratio[bn]
    measured = (f"step 0, log10(||grad W_1|| / ||grad W_{depth}||) (0 = balanced, < 0 vanishing toward the input, > 0 "
                f"exploding): BN {_spread(normed)}; no BN {_spread(plain)}")  # fmt: skip
    diff = paired(plain.abs(), normed.abs())
    if plain.mean() > -1:
        verdict, note = "inconclusive", "the plain network's gradients do not vanish here (less than 10x over depth)"
    else:
        verdict, note = decide(diff), ""
    if normed.mean() > 1:
        note = (note + "; " if note else "") + "BN's gradients grow toward the input (explode): not a cure"
    rows.append(claim_row(
        f"BN eases vanishing gradients ({act})", "seed article", "depth", setup, diff,
        unit="decades (|log10 ratio|, no BN - BN)", verdict=verdict, measured=measured, note=note,
        paper="(not the paper's claim; the paper argues BN keeps gradients well scaled)",
    ))  # fmt: skip
    growth = one_sample(normed)
    rows.append(claim_row(
        f"BN's gradients explode toward the input at initialisation ({act})", "Yang et al. 2019", "depth", setup,
        growth, unit="decades (log10 ratio with BN)", verdict=decide(growth), measured=measured,
        paper="(beyond the paper: mean-field theory predicts exploding gradients in deep BN networks)",
    ))  # fmt: skip
    return rows


def _saturation(df: pd.DataFrame) -> list[dict]:
    sub = df[df["experiment"] == "saturation"]
    rows = []
    bn = _bn_norm(sub["norm"])
    if sub.empty or bn is None:
        return rows
    sat = sub[sub["metric"].str.startswith("saturated/")].assign(metric="saturated")
    for g, group in _groups(sat):
        mode, rates = _modes(sub[sub["activation"] == g["activation"]], bn)[0]
        frac = _arms(per_run(group, "saturated", "mean"), rates)
        if not {"none", bn} <= set(frac.columns):
            continue
        diff = paired(frac["none"], frac[bn])
        if frac["none"].mean() < 0.05:
            verdict, note = "inconclusive", "the plain network barely saturates here: nothing for BN to reduce"
        else:
            verdict, note = decide(diff), ""
        rows.append(claim_row(
            f"BN reduces saturation ({g['activation']})", "paper, seed article", "saturation", _setup(g, mode), diff,
            unit="(saturated fraction, no BN - BN)", verdict=verdict, note=note,
            paper="BN keeps sigmoid inputs out of the saturated regime",
            measured=f"fraction of saturated units (mean over layers and probes during training): BN "
            f"{_spread(frac[bn])}; no BN {_spread(frac['none'])}",
        ))  # fmt: skip
    return rows


def _ics(df: pd.DataFrame) -> list[dict]:
    sub = df[df["experiment"] == "ics"]
    rows = []
    bn = _bn_norm(sub["norm"])
    rel = sub[sub["metric"].str.startswith("ics_rel/")].assign(metric="ics_rel")
    if rel.empty or bn is None:
        return rows
    for g, group in _groups(sub):
        mode, rates = _modes(group, bn)[0]
        shift = _arms(per_run(rel.merge(group[run_key(group)].drop_duplicates()), "ics_rel", "mean"), rates)
        acc = _arms(per_run(group, "test_acc", "tail"), rates)
        if not {"none", bn} <= set(shift.columns):
            continue
        diff = paired(shift["none"], shift[bn])
        lost = _at_chance(acc, "none", bn)
        rows.append(claim_row(
            "BN reduces internal covariate shift", "paper's motivation; Santurkar et al. 2018 say it does not", "ics",
            _setup(g, mode), diff, unit="(relative shift, no BN - BN)",
            verdict="inconclusive" if lost else decide(diff),
            paper="BN reduces internal covariate shift (the paper's motivation)",
            measured=f"||G - G'|| / ||G|| (a layer's gradient before/after the earlier layers' step; mean over layers "
            f"and steps): BN {_spread(shift[bn])}; no BN {_spread(shift['none'])}; final accuracy BN "
            f"{_spread(acc.get(bn, pd.Series(dtype=float)))}, no BN {_spread(acc.get('none', pd.Series(dtype=float)))}",
            note=f"{' and '.join(lost)} at chance: its gradients barely move, so they barely shift" if lost else "",
        ))  # fmt: skip
    return rows


_PAPER_STEPS = "2.3x fewer steps at the same rate (Inception, ImageNet); 14x with BN-x5 and other changes"
_PAPER_ACC = "higher test accuracy (MNIST Figure 1a; ImageNet)"


def verdict_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The verdict table, one row per claim, set-up and comparison (columns :data:`COLUMNS`)."""
    from bnbench.report.verdicts_beyond import beyond_rows

    rows = []
    for experiment, source in (("bn-paper", "paper (fair baselines)"), ("paper-literal", "paper (its set-up as "
                               "written)"), ("cnn", "paper, on a CNN")):  # fmt: skip
        sub = df[df["experiment"] == experiment]
        if len(sub):
            rows += _fair_claims(sub, experiment, source, _PAPER_STEPS, _PAPER_ACC)
            rows += _stability(sub, experiment) if experiment != "cnn" else []
            rows += _largest_rate(sub, source, experiment)
    rows += _depth(df)
    rows += _largest_rate(df[df["experiment"] == "lr"], "paper", "lr")
    rows += _saturation(df) + _ics(df) + beyond_rows(df)
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.astype({"held": object})
