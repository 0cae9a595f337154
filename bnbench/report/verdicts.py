"""Each claim about BatchNorm, tested against the measurements: one row per claim with what was measured and
whether it held. Everything is computed from the long results frame; nothing is hard-coded.

A claim holds (True) when BN is better in every seed, fails (False) when it is better in none, and is
inconclusive (None) when seeds disagree, when only one seed ran, or when the experiment could not tell (for
example, the plain network also trains at every depth tested).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["AGREE_ACC_ATOL", "AGREE_LOSS_ATOL", "AGREE_LOSS_RTOL", "RUN_KEY", "per_run", "verdict_rows"]

RUN_KEY = ["experiment", "dataset", "model", "depth", "width", "activation", "norm", "lr", "batch_size", "seed"]
#: fused-vs-eager: curves agree when at every evaluation |d test_acc| <= AGREE_ACC_ATOL and
#: |d train_loss| <= AGREE_LOSS_ATOL + AGREE_LOSS_RTOL * |train_loss(eager)|. Long runs may drift apart (training
#: is chaotic: a rounding-level difference that moves one ReLU input across 0 grows step by step); the claim then
#: still holds when the mean final accuracies agree within the spread over seeds (at least AGREE_ACC_ATOL).
AGREE_ACC_ATOL, AGREE_LOSS_ATOL, AGREE_LOSS_RTOL = 0.02, 0.01, 0.05


def per_run(df: pd.DataFrame, metric: str, how: str = "last") -> pd.DataFrame:
    """One row per run: RUN_KEY plus ``value``: the metric at the run's last step (``last``), its mean over all
    rows (``mean``), or its mean over the rows of the run's last step (``mean_last``, e.g. over layers)."""
    sub = df[df["metric"] == metric]
    if sub.empty:
        return pd.DataFrame(columns=[*RUN_KEY, "value"])
    if how == "mean_last":
        sub = sub[sub["step"] == sub.groupby(RUN_KEY, dropna=False)["step"].transform("max")]
        how = "mean"
    if how == "last":
        sub = sub.sort_values("step").groupby(RUN_KEY, dropna=False, sort=False).tail(1)
        return sub[[*RUN_KEY, "value"]].reset_index(drop=True)
    return sub.groupby(RUN_KEY, dropna=False, sort=False)["value"].mean().reset_index()


def _bn_norm(frame: pd.DataFrame) -> str | None:
    norms = set(frame["norm"])
    return "eager" if "eager" in norms else ("fused" if "fused" in norms else None)


def _pairs(frame: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Columns ``a`` and ``b``: the value of norm a and norm b for the same configuration and seed."""
    keys = [k for k in RUN_KEY if k != "norm"]
    wide = frame.drop_duplicates([*keys, "norm"]).set_index([*keys, "norm"])["value"].unstack("norm")
    if a not in wide or b not in wide:
        return pd.DataFrame(columns=[a, b])
    return wide[[a, b]]


def _fmt(values, digits: int = 3, missing: str = "never") -> str:
    """Mean and range of the finite values; infinite or NaN values are counted as ``missing``."""
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return missing
    text = f"{finite.mean():.{digits}g}"
    if finite.size > 1:
        text += f" (range {finite.min():.{digits}g}-{finite.max():.{digits}g})"
    if finite.size < v.size:
        text += f", {v.size - finite.size}/{v.size} {missing}"
    return text


def _decide(bn, base, higher_is_better: bool) -> tuple[bool | None, str]:
    """Paired by seed: True when BN is better in every seed, False in none, None when mixed or one seed."""
    bn, base = np.asarray(bn, dtype=float), np.asarray(base, dtype=float)
    n = bn.size
    if n == 0:
        return None, "no paired runs"
    better = bn > base if higher_is_better else bn < base
    wins = int(better.sum())
    if n < 2:
        return None, "one run pair only: no verdict"
    if wins == n:
        return True, f"BN better in {wins}/{n} run pairs (same seed and settings)"
    if wins == 0:
        return False, f"BN better in 0/{n} run pairs (same seed and settings)"
    return None, f"mixed: BN better in {wins}/{n} run pairs"


def _row(claim, source, experiment, measured, held, note) -> dict:
    return {"claim": claim, "source": source, "experiment": experiment, "measured": measured, "held": held,
            "note": note}  # fmt: skip


def _compare(df, experiment, metric, claim, source, *, higher_is_better, what, how="last", transform=None, where=None):
    frame = per_run(df[df["experiment"] == experiment], metric, how)
    if where is not None:
        frame = frame[where(frame)]
    if transform is not None:
        frame = frame.assign(value=transform(frame["value"]))
    bn = _bn_norm(frame)
    pairs = _pairs(frame, bn, "none") if bn else pd.DataFrame()
    if pairs.empty:
        return None
    held, note = _decide(pairs[bn], pairs["none"], higher_is_better)
    measured = f"{what}: BN {_fmt(pairs[bn])}; no BN {_fmt(pairs['none'])}"
    return _row(claim, source, experiment, measured, held, note), pairs


def _steps_to_target(df, experiment) -> list[dict]:
    target = per_run(df[df["experiment"] == experiment], "target_acc")["value"]
    what = f"steps to {target.iloc[0]:.0%} test accuracy" if len(target) else "steps to target"
    out = _compare(df, experiment, "steps_to_target", "BN trains in fewer steps", "paper, seed article",
                   higher_is_better=False, what=what, transform=lambda v: v.fillna(math.inf))  # fmt: skip
    if out is None:
        return []
    row, pairs = out
    bn = pairs.columns[0]
    if np.isinf(pairs[bn]).all() and np.isinf(pairs["none"]).all():
        row.update(held=None, note="neither network reached the target")
    elif np.isfinite(pairs).all(axis=None):
        ratio = (pairs["none"] / pairs[bn].replace(0, np.nan)).dropna()
        if len(ratio):
            row["measured"] += f"; no-BN/BN ratio {_fmt(ratio, 2)} (paper: 14x on ImageNet, with other changes)"
    return [row]


def _bn_paper(df) -> list[dict]:
    rows = _steps_to_target(df, "bn-paper")
    out = _compare(df, "bn-paper", "test_acc", "BN reaches a higher test accuracy", "paper, seed article",
                   higher_is_better=True, what="final test accuracy")  # fmt: skip
    if out:
        rows.append(out[0])
    acc, train = (per_run(df[df["experiment"] == "bn-paper"], m) for m in ("test_acc", "train_acc"))
    if len(acc) and len(train):
        gap = acc.merge(train, on=RUN_KEY, suffixes=("_test", "_train"))
        gap = gap.assign(value=gap["value_train"] - gap["value_test"])
        bn = _bn_norm(gap)
        pairs = _pairs(gap, bn, "none") if bn else pd.DataFrame()
        if not pairs.empty:
            held, note = _decide(pairs[bn], pairs["none"], higher_is_better=False)
            measured = f"train-test accuracy gap at the end: BN {_fmt(pairs[bn])}; no BN {_fmt(pairs['none'])}"
            note += "; a smaller gap is weak evidence of regularisation (also depends on how well each fits)"
            rows.append(_row("BN regularises slightly (smaller generalisation gap)", "paper, seed article",
                             "bn-paper", measured, held, note))  # fmt: skip
    drift = _percentile_drift(df[df["experiment"] == "bn-paper"])
    if len(drift):
        bn = _bn_norm(drift)
        pairs = _pairs(drift, bn, "none") if bn else pd.DataFrame()
        if not pairs.empty:
            held, note = _decide(pairs[bn], pairs["none"], higher_is_better=False)
            measured = (f"drift of the 15/50/85th percentiles of a last-layer sigmoid input (range over training / "
                        f"mean 15-85 band width): BN {_fmt(pairs[bn])}; no BN {_fmt(pairs['none'])}")  # fmt: skip
            rows.append(_row("BN keeps a layer's input distribution stable (paper's Figure 1)", "paper",
                             "bn-paper", measured, held, note))  # fmt: skip
    return rows


def _percentile_drift(df) -> pd.DataFrame:
    """Per run: mean over p in (15, 50, 85) of range(pct_p over steps > 0) / mean(pct85 - pct15)."""
    sub = df[df["metric"].str.startswith("pct") & (df["step"] > 0)]
    if sub.empty:
        return pd.DataFrame(columns=[*RUN_KEY, "value"])
    sub = sub.assign(p=sub["metric"].str.extract(r"^pct(\d+)/")[0].astype(int))
    rows = []
    for key, run in sub.groupby(RUN_KEY, dropna=False, sort=False):
        wide = run.pivot_table(index="step", columns="p", values="value")
        if not {15, 85} <= set(wide.columns):
            continue
        width = (wide[85] - wide[15]).mean()
        span = (wide.max() - wide.min()).mean()
        rows.append({**dict(zip(RUN_KEY, key, strict=True)), "value": span / width if width > 0 else math.nan})
    return pd.DataFrame(rows, columns=[*RUN_KEY, "value"])


def _depth(df) -> list[dict]:
    sub = df[df["experiment"] == "depth"]
    rows = []
    for act in sorted(set(sub["activation"])):
        one = sub[sub["activation"] == act]
        deepest = int(one["depth"].max())
        reached = per_run(one, "reached_target")
        target = per_run(one, "target_acc")["value"]
        if len(reached):
            ok = reached.groupby(["norm", "depth"])["value"].min()  # 1 only when every seed reached it
            trainable = {n: max([d for (m, d), v in ok.items() if m == n and v >= 1], default=0)
                         for n in set(reached["norm"])}  # fmt: skip
            bn = _bn_norm(reached)
            if bn and "none" in trainable:
                b, p = trainable[bn], trainable["none"]
                held = True if b > p else (None if b == p and b in (0, deepest) else False)
                if held is None:
                    note = ("both train at every depth tested: the sweep cannot show the claim" if b else
                            "neither network reaches the target at any depth: train longer")  # fmt: skip
                else:
                    note = f"BN {'extends' if held else 'does not extend'} the trainable depth"
                measured = (f"deepest depth (of {sorted(set(one['depth']))}) where every seed reaches "
                            f"{target.iloc[0]:.0%}: BN {b or 'none'}; no BN {p or 'none'}")  # fmt: skip
                rows.append(_row(f"BN lets deep {act} networks train", "paper, seed article", "depth", measured,
                                 held, note))  # fmt: skip
        g_first = per_run(one[one["step"] == 0], "grad_norm/layer1")
        g_last = per_run(one[one["step"] == 0], f"grad_norm/layer{deepest}")
        if len(g_first) and len(g_last):
            ratio = g_first.merge(g_last, on=RUN_KEY)
            ratio = ratio[ratio["depth"] == deepest]
            ratio = ratio.assign(value=ratio["value_x"] / ratio["value_y"])
            bn = _bn_norm(ratio)
            pairs = _pairs(ratio, bn, "none") if bn else pd.DataFrame()
            if not pairs.empty:
                held, note = _decide(pairs[bn], pairs["none"], higher_is_better=True)
                measured = (f"depth {deepest}, step 0: gradient norm of layer 1 / layer {deepest}: "
                            f"BN {_fmt(pairs[bn], 2)}; no BN {_fmt(pairs['none'], 2)}")  # fmt: skip
                rows.append(_row(f"BN eases vanishing gradients ({act})", "seed article", "depth", measured,
                                 held, note))  # fmt: skip
        if act in ("sigmoid", "tanh"):
            sat = one[one["metric"].str.startswith("saturated/") & (one["depth"] == deepest)]
            sat = sat.assign(metric="saturated")
            out = _compare(sat, "depth", "saturated", f"BN reduces saturation ({act})", "seed article",
                           higher_is_better=False, what=f"depth {deepest}, end of training: fraction of saturated "
                           "units (mean over layers)", how="mean_last")  # fmt: skip
            if out:
                row, pairs = out
                if pairs["none"].max() < 0.01:
                    row["note"] += ("; the plain network has (almost) no saturated units: it fails, where it "
                                    "fails, for another reason (see the gradient norms)")  # fmt: skip
                rows.append(row)
    return rows


def _lr(df) -> list[dict]:
    sub = df[df["experiment"] == "lr"]
    reached, diverged = per_run(sub, "reached_target"), per_run(sub, "diverged")
    if reached.empty:
        return []
    ok = reached.merge(diverged, on=RUN_KEY)
    ok = ok[(ok["value_x"] >= 1) & (ok["value_y"] < 1)]
    keys = [k for k in RUN_KEY if k != "lr"]
    best = reached[keys].drop_duplicates().merge(ok.groupby(keys)["lr"].max().reset_index(), how="left", on=keys)
    rows = []
    for act, one in best.groupby("activation"):
        frame = one.rename(columns={"lr": "value"}).assign(lr=0.0)
        bn = _bn_norm(frame)
        pairs = _pairs(frame, bn, "none") if bn else pd.DataFrame()
        if pairs.empty:
            continue
        if pairs.isna().all(axis=None):
            held, note = None, "no rate reached the target in either network"
        else:
            held, note = _decide(pairs[bn].fillna(0), pairs["none"].fillna(0), higher_is_better=True)
        rates = sorted(set(sub["lr"]))
        measured = (f"largest learning rate (of {rates}) that reaches the target without diverging ({act}): "
                    f"BN {_fmt(pairs[bn], missing='none')}; no BN {_fmt(pairs['none'], missing='none')}")  # fmt: skip
        rows.append(_row(f"BN tolerates higher learning rates ({act})", "paper", "lr", measured, held, note))
    return rows


def _ics(df) -> list[dict]:
    sub = df[df["experiment"] == "ics"]
    cos = sub[sub["metric"].str.startswith("ics_cos/")].assign(metric="ics_cos")
    l2 = sub[sub["metric"].str.startswith("ics_l2/")].assign(metric="ics_l2")
    out = _compare(cos, "ics", "ics_cos", "BN reduces internal covariate shift (Santurkar et al. 2018: it does not)",
                   "paper's motivation", higher_is_better=True, what="cosine between a layer's gradient before and "
                   "after the earlier layers' step (1 = no shift; mean over layers and steps)", how="mean")  # fmt: skip
    if out is None:
        return []
    row = out[0]
    l2_run = per_run(l2, "ics_l2", "mean")
    bn = _bn_norm(l2_run)
    if bn:
        pairs = _pairs(l2_run, bn, "none")
        row["measured"] += f"; ||G - G'||: BN {_fmt(pairs[bn])}, no BN {_fmt(pairs['none'])} (scale differs with BN)"
    return [row]


def _fused(df) -> list[dict]:
    sub = df[df["experiment"] == "fused-vs-eager"]
    if sub.empty or not {"eager", "fused"} <= set(sub["norm"]):
        return []
    backends = sorted(set(sub.loc[sub["norm"] == "fused", "backend"])) if "backend" in sub else ["unknown"]
    keys = [k for k in RUN_KEY if k != "norm"]
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
    measured = (f"{n} eager/fused run pairs (backend {', '.join(backends)}): max relative train-loss difference "
                f"{worst_loss:.2g}, max test-accuracy difference {worst_acc:.3g}")  # fmt: skip
    tol = (f"tolerance per evaluation: |d acc| <= {AGREE_ACC_ATOL}, |d loss| <= {AGREE_LOSS_ATOL} + "
           f"{AGREE_LOSS_RTOL} |loss|")  # fmt: skip
    held = ok
    if not ok:  # chaos or a bug? compare the outcome with the spread over seeds
        final = _pairs(per_run(sub, "test_acc"), "fused", "eager").dropna()
        if len(final):
            f, e = final["fused"], final["eager"]
            spread = max(AGREE_ACC_ATOL, float(e.max() - e.min()), float(f.max() - f.min()))
            gap = abs(float(f.mean() - e.mean()))
            held = gap <= spread
            measured += f"; final test accuracy: fused {_fmt(f)}, eager {_fmt(e)}"
            tol += (
                f"; outside it, the final accuracies must agree within the seed spread ({spread:.3g}): "
                + ("they do. The curves drift apart, as training amplifies rounding-level differences (a usual cause: "
                   "one ReLU input within ~1e-7 of 0 lands on the other side, which flips one gradient term)"
                   if held else f"they differ by {gap:.3g}")
            )  # fmt: skip
    if backends == ["torch"]:
        held, tol = (
            None,
            "the fused layer ran the PyTorch reference (no Triton here): nothing of the kernels was tested",
        )
    rows = [_row("The fused layer trains like eager BN (same curves)", "bnbench", "fused-vs-eager", measured, held,
                 tol)]  # fmt: skip
    ms = _pairs(per_run(sub, "ms_per_step"), "fused", "eager")
    if backends == ["triton"] and len(ms):
        speed = ms["eager"] / ms["fused"]
        held, note = _decide(ms["fused"], ms["eager"], higher_is_better=False)
        measured = f"eager/fused time per step: {_fmt(speed, 3)} (ms per step: fused {_fmt(ms['fused'])}, eager {_fmt(ms['eager'])})"
    else:
        held, measured = None, "not timed"
        note = ("the Triton kernels ran in the interpreter (CPU): timings mean nothing" if "triton-interpreter" in backends
                else "no Triton kernel ran")  # fmt: skip
    rows.append(_row("The fused layer makes training faster end to end", "bnbench", "fused-vs-eager", measured, held,
                     note))  # fmt: skip
    return rows


def verdict_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The verdict table: claim, source, experiment, measured, held (True/False/None), note."""
    rows = _bn_paper(df) + _depth(df) + _lr(df) + _ics(df) + _fused(df)
    table = pd.DataFrame(rows, columns=["claim", "source", "experiment", "measured", "held", "note"])
    return table.astype({"held": object})
