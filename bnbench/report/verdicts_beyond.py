"""Claims beyond the paper, tested like its own (see :mod:`bnbench.report.verdicts` for the shared rules):
regularisation at matched training loss, batch-size dependence with LayerNorm and GroupNorm beside BN,
Santurkar et al.'s controls (noisy BN, smoothness along the gradient), and bnbench's fused layer.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bnbench.report.effects import Effect, decide, decide_equivalent, paired
from bnbench.report.verdicts import TAIL, _arms, _groups, _setup, _spread, claim_row, per_run, run_key

__all__ = ["AGREE_ACC_ATOL", "AGREE_LOSS_ATOL", "AGREE_LOSS_RTOL", "EQUIVALENCE_MARGIN", "beyond_rows",
           "matched_loss_accuracy"]  # fmt: skip

#: fused-vs-eager: curves agree when at every evaluation |d test_acc| <= AGREE_ACC_ATOL and
#: |d train_loss| <= AGREE_LOSS_ATOL + AGREE_LOSS_RTOL * |train_loss(eager)|
AGREE_ACC_ATOL, AGREE_LOSS_ATOL, AGREE_LOSS_RTOL = 0.02, 0.01, 0.05
#: "trains about as well": the accuracy difference's interval lies within +-EQUIVALENCE_MARGIN
EQUIVALENCE_MARGIN = 0.02


def _curve(run: pd.DataFrame, metric: str) -> pd.Series:
    return run[run["metric"] == metric].groupby("step")["value"].mean().sort_index()


def matched_loss_accuracy(run_a: pd.DataFrame, run_b: pd.DataFrame) -> tuple[float, float, float]:
    """Test accuracy of two runs where each first reaches the same training loss (eval mode, a fixed training
    subset): the lowest level both reach, L* = max(min loss_a, min loss_b). The step where a run's loss crosses
    L* and its accuracy there are interpolated linearly between evaluations. Returns (L*, acc_a, acc_b)."""
    out = []
    curves = [(_curve(r, "train_eval_loss"), _curve(r, "test_acc")) for r in (run_a, run_b)]
    if any(loss.empty or acc.empty for loss, acc in curves):
        return math.nan, math.nan, math.nan
    level = max(float(loss.min()) for loss, _ in curves)
    for loss, acc in curves:
        below = np.flatnonzero(loss.to_numpy() <= level)
        i = int(below[0])
        steps = loss.index.to_numpy(dtype=float)
        if i == 0:
            at = steps[0]
        else:
            l0, l1 = loss.iloc[i - 1], loss.iloc[i]
            frac = (l0 - level) / (l0 - l1) if l0 != l1 else 1.0
            at = steps[i - 1] + frac * (steps[i] - steps[i - 1])
        out.append(float(np.interp(at, acc.index.to_numpy(dtype=float), acc.to_numpy())))
    return level, out[0], out[1]


def _arm_name(norm: str, dropout: float) -> str:
    base = {"none": "no BN", "eager": "BN", "fused": "BN"}.get(norm, norm)
    return f"{base} + dropout {dropout:g}" if dropout else base


def _regularization(df: pd.DataFrame) -> list[dict]:
    sub = df[df["experiment"] == "regularization"]
    if sub.empty or "dropout" not in sub:
        return []
    rows = []
    key = [c for c in run_key(sub) if c not in ("norm", "dropout", "seed")]
    comparisons = ((("eager", 0.0), ("none", 0.0), "BN regularises (higher test accuracy at matched training loss)",
                    "paper"),
                   (("none", 0.5), ("none", 0.0), "Dropout regularises (the positive control)", "control"),
                   (("eager", 0.5), ("eager", 0.0), "Dropout still helps on top of BN", "paper: BN reduces the need "
                    "for dropout"))  # fmt: skip
    for k, group in sub.groupby(key, dropna=False, sort=False):
        g = dict(zip(key, k, strict=True))
        dropouts = sorted(set(group["dropout"]) - {0.0})
        for (na, da), (nb, db), claim, source in comparisons:
            da = dropouts[0] if da and dropouts else da
            db = dropouts[0] if db and dropouts else db
            a_runs = group[(group["norm"] == na) & (group["dropout"] == da)]
            b_runs = group[(group["norm"] == nb) & (group["dropout"] == db)]
            seeds = sorted(set(a_runs["seed"]) & set(b_runs["seed"]))
            if not seeds:
                continue
            matched = [matched_loss_accuracy(a_runs[a_runs["seed"] == s], b_runs[b_runs["seed"] == s]) for s in seeds]
            level, acc_a, acc_b = (np.array(v) for v in zip(*matched, strict=True))
            diff = paired(acc_a, acc_b)
            setup = _setup(g, f"weight decay {g.get('weight_decay', 0):g}, lr {g['lr']:g}")
            rows.append(claim_row(
                claim, source, "regularization", setup, diff, unit=f"(accuracy, {_arm_name(na, da)} - "
                f"{_arm_name(nb, db)})", verdict=decide(diff),
                paper="BN regularises, reducing the need for dropout" if source != "control" else "",
                measured=f"test accuracy where both first reach training loss {_spread(level)} (eval mode): "
                f"{_arm_name(na, da)} {_spread(acc_a)}; {_arm_name(nb, db)} {_spread(acc_b)}",
            ))  # fmt: skip
    return rows


def _batch_size(df: pd.DataFrame) -> list[dict]:
    sub = df[df["experiment"] == "batch-size"]
    if sub.empty:
        return []
    rows = []
    small, large = min(sub["batch_size"]), max(sub["batch_size"])
    acc = per_run(sub, "test_acc", "tail")
    key = [c for c in run_key(sub) if c not in ("batch_size", "norm", "seed", "experiment")]
    for k, group in acc.groupby(key, dropna=False, sort=False):
        g = dict(zip(key, k, strict=True)) | {"batch_size": f"{small}-{large}"}
        setup = _setup(g, "equal epochs")
        by = {
            b: one.pivot_table(index="seed", columns="norm", values="value") for b, one in group.groupby("batch_size")
        }
        if small == large or "eager" not in by[small] or "eager" not in by[large]:
            continue
        drop = {n: by[large][n] - by[small][n] for n in by[small].columns if n in by[large]}
        if "none" in drop:
            diff = paired(drop["eager"], drop["none"])
            rows.append(claim_row(
                f"Small batches hurt BN more than no normalisation (batch {small} vs {large})", "Ioffe 2017 "
                "(batch renormalisation)", "batch-size", setup, diff, unit="(accuracy lost, BN - no BN)",
                verdict=decide(diff), measured=f"accuracy at batch {large} minus at batch {small}: BN "
                f"{_spread(drop['eager'])}; no BN {_spread(drop['none'])}",
            ))  # fmt: skip
        for norm, name in (("layernorm", "LayerNorm"), ("groupnorm", "GroupNorm")):
            for b in (small, large):
                if norm in by[b]:
                    diff = paired(by[b][norm], by[b]["eager"])
                    rows.append(claim_row(
                        f"{name} beats BN at batch {b}", "Ba et al. 2016; Wu and He 2018", "batch-size",
                        setup, diff, unit=f"(accuracy, {name} - BN)", verdict=decide(diff),
                        measured=f"final test accuracy at batch {b}: {name} {_spread(by[b][norm])}; BN "
                        f"{_spread(by[b]['eager'])}",
                    ))  # fmt: skip
    batch_acc = per_run(sub, "test_acc_batch")
    if len(batch_acc):
        last = per_run(sub, "test_acc").merge(batch_acc, on=[*run_key(sub), "step"])
        for b, one in last[last["norm"] == "eager"].groupby("batch_size"):
            diff = paired(one["value_y"], one["value_x"])
            rows.append(claim_row(
                f"BN's train-mode and eval-mode accuracies differ at batch {b}", "bnbench", "batch-size",
                f"{one['dataset'].iloc[0]}, batch {b}, equal epochs", diff,
                unit="(accuracy, batch statistics - running statistics)", verdict=decide(diff, two_sided=True),
                measured=f"final test accuracy with the test batch's own statistics {_spread(one['value_y'])}; with "
                f"running statistics {_spread(one['value_x'])}",
            ))  # fmt: skip
    return rows


def _santurkar(df: pd.DataFrame) -> list[dict]:
    sub = df[df["experiment"] == "santurkar"]
    if sub.empty or not {"none", "eager"} <= set(sub["norm"]):
        return []
    rows = []
    for g, group in _groups(sub.drop(columns="noise")):
        rates = {n: g_lr for n, g_lr in ((n, sorted(set(group["lr"]))[0]) for n in ("none", "eager", "noisy"))}
        setup = _setup(g, f"lr {rates['none']:g}, noise magnitude {sub['noise'].max():g}")
        acc = _arms(per_run(group, "test_acc", "tail"), rates)
        if "noisy" in acc:
            diff = paired(acc["noisy"], acc["none"])
            rows.append(claim_row(
                "Noisy BN (covariate shift injected after BN) still beats no BN", "Santurkar et al. 2018", "santurkar",
                setup, diff, unit="(accuracy, noisy BN - no BN)", verdict=decide(diff),
                measured=f"final test accuracy: noisy BN {_spread(acc['noisy'])}; no BN {_spread(acc['none'])}; BN "
                f"{_spread(acc['eager'])}",
            ))  # fmt: skip
            same = paired(acc["noisy"], acc["eager"])
            rows.append(claim_row(
                "Noisy BN trains about as well as BN", "Santurkar et al. 2018", "santurkar", setup, same,
                unit="(accuracy, noisy BN - BN)", verdict=decide_equivalent(same, EQUIVALENCE_MARGIN),
                measured=f"final test accuracy: noisy BN {_spread(acc['noisy'])}; BN {_spread(acc['eager'])}",
                note=f"holds when the interval lies within +-{EQUIVALENCE_MARGIN}",
            ))  # fmt: skip
        for metric, claim in (("smooth_loss_range", "BN makes the loss smoother along the gradient"),
                              ("smooth_beta", "BN makes the gradient more predictive (smaller effective beta)")):  # fmt: skip
            values = _arms(per_run(group, metric, "mean"), rates)
            if not {"none", "eager"} <= set(values.columns):
                continue
            diff = paired(np.log10(values["none"]), np.log10(values["eager"]))
            rows.append(claim_row(
                claim, "Santurkar et al. 2018", "santurkar", setup, diff, unit="decades (log10 no BN / BN)",
                verdict=decide(diff), measured=f"{metric} (mean over probes): BN {_spread(values['eager'])}; no BN "
                f"{_spread(values['none'])}",
            ))  # fmt: skip
    return rows


def _fused(df: pd.DataFrame) -> list[dict]:
    sub = df[df["experiment"] == "fused-vs-eager"]
    if sub.empty or not {"eager", "fused"} <= set(sub["norm"]):
        return []
    backends = sorted(set(sub.loc[sub["norm"] == "fused", "backend"])) if "backend" in sub else ["unknown"]
    keys = [k for k in run_key(sub) if k != "norm"]
    worst_loss, worst_acc, ok, n = 0.0, 0.0, True, 0
    for metric in ("train_loss", "test_acc"):
        m = sub[sub["metric"] == metric].set_index([*keys, "step", "norm"])["value"].unstack("norm").dropna()
        n = max(n, len(m.groupby(level=keys)))
        diff = (m["fused"] - m["eager"]).abs()
        if metric == "train_loss":
            worst_loss = float((diff / m["eager"].abs().clip(lower=1e-12)).max())
            ok &= bool((diff <= AGREE_LOSS_ATOL + AGREE_LOSS_RTOL * m["eager"].abs()).all())
        else:
            worst_acc = float(diff.max())
            ok &= bool((diff <= AGREE_ACC_ATOL).all())
    final = per_run(sub, "test_acc", "tail").pivot_table(index=keys, columns="norm", values="value")
    gap = paired(final["fused"], final["eager"]) if {"fused", "eager"} <= set(final.columns) else Effect(
        math.nan, math.nan, math.nan, 0)  # fmt: skip
    measured = (f"{n} eager/fused run pairs (backend {', '.join(backends)}): max relative train-loss difference "
                f"{worst_loss:.2g}, max test-accuracy difference {worst_acc:.3g} over every evaluation")  # fmt: skip
    note = (f"tolerance per evaluation: |d acc| <= {AGREE_ACC_ATOL}, |d loss| <= {AGREE_LOSS_ATOL} + "
            f"{AGREE_LOSS_RTOL} |loss|; final accuracy fused - eager (a note, not the verdict): "
            f"{gap.estimate:.3g}")  # fmt: skip
    verdict = "holds" if ok else "opposite"
    if backends == ["torch"]:
        verdict, note = "inconclusive", "the fused layer ran the PyTorch reference (no Triton here): nothing tested"
    rows = [claim_row("The fused layer trains like eager BN (same curves)", "bnbench", "fused-vs-eager",
                      f"{', '.join(sorted(set(sub['model'])))} on {sub['dataset'].iloc[0]}, {TAIL}+ evaluations", gap,
                      unit="(final accuracy, fused - eager)", verdict=verdict, measured=measured, note=note)]  # fmt: skip
    ms = per_run(sub, "ms_per_step").pivot_table(index=keys, columns="norm", values="value")
    if backends == ["triton"] and {"fused", "eager"} <= set(ms.columns):
        speed = paired(np.log(ms["eager"]), np.log(ms["fused"]))
        rows.append(claim_row(
            "The fused layer makes training faster end to end", "bnbench", "fused-vs-eager", "as above",
            speed.scaled(math.exp), unit="x (eager / fused time per step)", verdict=decide(speed), null=1.0,
            measured=f"ms per step: fused {_spread(ms['fused'])}, eager {_spread(ms['eager'])}",
        ))  # fmt: skip
    else:
        rows.append(claim_row(
            "The fused layer makes training faster end to end", "bnbench", "fused-vs-eager", "as above",
            Effect(math.nan, math.nan, math.nan, 0), unit="", verdict="inconclusive", measured="not timed",
            note="the Triton kernels ran in the interpreter (CPU): timings mean nothing"
            if "triton-interpreter" in backends else "no Triton kernel ran",
        ))  # fmt: skip
    return rows


def beyond_rows(df: pd.DataFrame) -> list[dict]:
    """The rows of every claim in this module that the frame can test."""
    return _regularization(df) + _batch_size(df) + _santurkar(df) + _fused(df)
