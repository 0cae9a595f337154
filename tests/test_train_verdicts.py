"""The verdict rules on constructed frames with a known answer: paired intervals, ties, intervals straddling
zero, arms at chance, fair baselines (same rate vs best rates), vanishing vs exploding gradients, saturation that
never happens, regularisation at matched training loss, and fused-vs-eager agreement."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bnbench.report.effects import decide, decide_equivalent, one_sample, paired, t_quantile
from bnbench.report.verdicts import per_run, verdict_rows
from bnbench.report.verdicts_beyond import matched_loss_accuracy


def _rows(experiment, norm, seed, values, *, lr=0.1, depth=3, activation="sigmoid", dropout=0.0, wd=0.0,
          batch=60, backend=None):  # fmt: skip
    base = {"experiment": experiment, "dataset": "digits", "model": "mlp", "depth": depth, "width": 8,
            "activation": activation, "norm": norm, "lr": lr, "batch_size": batch, "seed": seed, "init": "auto",
            "optimizer": "sgd", "momentum": 0.9, "weight_decay": wd, "dropout": dropout, "noise": 0.0,
            "backend": backend or {"none": "none", "fused": "triton"}.get(norm, "torch")}  # fmt: skip
    return [base | {"step": s, "wall_s": s / 100, "metric": m, "value": v} for m, v, s in values]


def _curve(acc_end, steps_to=math.nan, end=100):
    """A run's accuracy curve ending at acc_end (the last 3 evaluations at acc_end), and its summary rows."""
    return [("test_acc", 0.1, 0), ("test_acc", acc_end, end - 20), ("test_acc", acc_end, end - 10),
            ("test_acc", acc_end, end), ("val_acc", acc_end, end), ("steps_to_target", steps_to, end),
            ("target_acc", 0.9, end), ("reached_target", float(not math.isnan(steps_to)), end),
            ("diverged", 0.0, end)]  # fmt: skip


def _row(table, claim, setup_part=""):
    rows = table[table["claim"].str.startswith(claim) & table["setup"].str.contains(setup_part, regex=False)]
    assert len(rows) == 1, (claim, setup_part, list(zip(table["claim"], table["setup"], strict=True)))
    return rows.iloc[0]


# ---- the statistics -------------------------------------------------------------------------------------------


def test_paired_interval_is_students_t():
    eff = paired([3.0, 4.0, 5.0, 6.0], [1.0, 1.0, 1.0, 1.0])
    half = t_quantile(3) * np.std([2, 3, 4, 5], ddof=1) / 2
    assert eff.estimate == 3.5 and eff.low == pytest.approx(3.5 - half) and eff.high == pytest.approx(3.5 + half)
    assert t_quantile(4) == 2.776 and t_quantile(1000) == pytest.approx(1.962, abs=1e-3)


@pytest.mark.parametrize(
    ("a", "b", "verdict"),
    [
        ([0.9, 0.92, 0.91], [0.8, 0.81, 0.8], "holds"),  # BN better, interval above 0
        ([0.8, 0.81, 0.8], [0.9, 0.92, 0.91], "opposite"),  # interval below 0
        ([0.9, 0.9, 0.9], [0.9, 0.9, 0.9], "tie"),  # every difference exactly 0: a tie, not a loss
        ([0.9, 0.8, 0.95], [0.85, 0.85, 0.85], "inconclusive"),  # straddles 0
        ([0.9], [0.8], "inconclusive"),  # one pair: no interval
        ([0.9, math.nan], [0.8, 0.7], "inconclusive"),  # the pair with NaN is dropped: one left
    ],
)
def test_decide(a, b, verdict):
    assert decide(paired(a, b)) == verdict


def test_two_sided_and_equivalence():
    below = paired([0.7, 0.71, 0.72], [0.8, 0.8, 0.81])
    assert decide(below) == "opposite" and decide(below, two_sided=True) == "holds"
    close = paired([0.901, 0.899, 0.9], [0.9, 0.9, 0.9])
    assert decide_equivalent(close, 0.02) == "holds"
    assert decide_equivalent(below, 0.02) == "opposite"
    assert decide_equivalent(one_sample([0.0, 0.05, -0.04]), 0.02) == "inconclusive"


# ---- the paper's claims -------------------------------------------------------------------------------------------


def _paper(bn_steps, plain_steps, bn_acc=0.95, plain_acc=0.92, lrs=(0.1,)):
    rows = []
    for seed, (b, p) in enumerate(zip(bn_steps, plain_steps, strict=True)):
        for lr in lrs:
            rows += _rows("bn-paper", "eager", seed, _curve(bn_acc, b), lr=lr)
            rows += _rows("bn-paper", "none", seed, _curve(plain_acc, p), lr=lr)
    return pd.DataFrame(rows)


def test_steps_claim_uses_a_ratio_interval_and_counts_never_as_the_run_length():
    row = _row(verdict_rows(_paper([10, 20, 15], [40, 50, 45])), "BN trains in fewer steps")
    assert row["verdict"] == "holds" and row["held"] is True and row["null"] == 1.0
    assert row["estimate"] == pytest.approx(math.exp(np.mean(np.log([4, 2.5, 3]))))
    row = _row(verdict_rows(_paper([10, 20, 15], [math.nan] * 3)), "BN trains in fewer steps")
    assert row["verdict"] == "holds" and "never reached" in row["note"]  # a lower bound, still above 1
    row = _row(verdict_rows(_paper([math.nan] * 3, [math.nan] * 3)), "BN trains in fewer steps")
    assert row["verdict"] == "inconclusive"
    row = _row(verdict_rows(_paper([10, 60, 15], [40, 30, 45])), "BN trains in fewer steps")
    assert row["verdict"] == "inconclusive"  # the interval straddles 1


def test_an_arm_at_chance_makes_accuracy_claims_inconclusive_only_when_both_are():
    table = verdict_rows(_paper([10, 20, 15], [40, 50, 45], bn_acc=0.11, plain_acc=0.1))
    assert _row(table, "BN reaches a higher test accuracy")["verdict"] == "inconclusive"
    table = verdict_rows(_paper([10, 20, 15], [40, 50, 45], bn_acc=0.9, plain_acc=0.1))
    assert _row(table, "BN reaches a higher test accuracy")["verdict"] == "holds"


def test_fair_baselines_compare_at_the_plain_nets_best_rate_and_at_each_best():
    """No BN is best at 0.1 (0.92), BN at 1.0 (0.97); at 0.1 BN reaches only 0.90: BN loses at the same rate,
    wins at the best rates."""
    rows = []
    acc = {("none", 0.1): 0.92, ("none", 1.0): 0.5, ("eager", 0.1): 0.90, ("eager", 1.0): 0.97}
    for seed in range(3):
        for (norm, lr), a in acc.items():
            rows += _rows("bn-paper", norm, seed, _curve(a + 0.001 * seed, 50), lr=lr)
    table = verdict_rows(pd.DataFrame(rows))
    assert _row(table, "BN reaches a higher test accuracy", "same rate 0.1")["verdict"] == "opposite"
    assert _row(table, "BN reaches a higher test accuracy", "best rates (no BN 0.1, BN 1")["verdict"] == "holds"


def test_final_accuracy_is_the_mean_of_the_last_evaluations():
    frame = pd.DataFrame(_rows("bn-paper", "eager", 0, [("test_acc", v, s) for s, v in
                                                        enumerate([0.1, 0.5, 0.8, 0.9, 1.0])]))  # fmt: skip
    assert per_run(frame, "test_acc", "tail")["value"].item() == pytest.approx(0.9)
    assert per_run(frame, "test_acc")["value"].item() == 1.0


def _depth(plain_ratio, bn_ratio, plain_acc=0.1, bn_acc=0.9):
    rows = []
    for seed in range(3):
        jitter = 1 + 0.05 * seed
        for norm, ratio, acc in (("none", plain_ratio, plain_acc), ("eager", bn_ratio, bn_acc)):
            rows += _rows("depth", norm, seed, [*_curve(acc, 50 if acc > 0.5 else math.nan),
                          ("grad_norm/layer1", ratio * jitter, 0), ("grad_norm/layer20", 1.0, 0)], depth=20)  # fmt: skip
    return pd.DataFrame(rows)


def test_vanishing_and_exploding_gradients_are_scored_apart():
    table = verdict_rows(_depth(plain_ratio=1e-6, bn_ratio=1.5))  # plain vanishes, BN balanced
    assert _row(table, "BN eases vanishing gradients")["verdict"] == "holds"
    assert _row(table, "BN lets deep sigmoid networks train")["verdict"] == "holds"
    table = verdict_rows(_depth(plain_ratio=0.9, bn_ratio=45))  # plain fine, BN explodes: not a cure
    row = _row(table, "BN eases vanishing gradients")
    assert row["verdict"] == "inconclusive" and "do not vanish" in row["note"] and "explode" in row["note"]
    assert _row(table, "BN's gradients explode")["verdict"] == "holds"
    table = verdict_rows(_depth(plain_ratio=1e-3, bn_ratio=1e5))  # BN's explosion is worse than the vanishing
    assert _row(table, "BN eases vanishing gradients")["verdict"] == "opposite"
    table = verdict_rows(_depth(plain_ratio=1e-6, bn_ratio=1.0, plain_acc=0.1, bn_acc=0.1))
    assert _row(table, "BN lets deep sigmoid networks train")["verdict"] == "inconclusive"  # both at chance


@pytest.mark.parametrize(("plain_sat", "verdict"), [(0.4, "holds"), (0.001, "inconclusive")])
def test_saturation_needs_a_plain_network_that_saturates(plain_sat, verdict):
    rows = []
    for seed in range(3):
        for norm, sat in (("none", plain_sat + 0.01 * seed), ("eager", 0.0001 * seed)):
            rows += _rows("saturation", norm, seed, [*_curve(0.9), ("saturated/layer1", sat, 50),
                                                     ("saturated/layer1", sat, 100)])  # fmt: skip
    assert _row(verdict_rows(pd.DataFrame(rows)), "BN reduces saturation")["verdict"] == verdict


@pytest.mark.parametrize(("plain_acc", "verdict"), [(0.9, "holds"), (0.1, "inconclusive")])
def test_ics_counts_only_where_both_arms_train(plain_acc, verdict):
    rows = []
    for seed in range(3):
        for norm, shift, acc in (("none", 0.15 + 0.01 * seed, plain_acc), ("eager", 0.11, 0.9)):
            rows += _rows(
                "ics", norm, seed, [*_curve(acc), ("ics_rel/layer2", shift, 0), ("ics_rel/layer3", shift, 50)]
            )
    row = _row(verdict_rows(pd.DataFrame(rows)), "BN reduces internal covariate shift")
    assert row["verdict"] == verdict and row["unit"].startswith("(relative shift")


# ---- beyond the paper -------------------------------------------------------------------------------------------


def test_matched_loss_interpolates_where_both_reach_the_same_training_loss():
    a = pd.DataFrame(_rows("regularization", "eager", 0, [("train_eval_loss", 1.0, 0), ("train_eval_loss", 0.2, 10),
                     ("test_acc", 0.5, 0), ("test_acc", 0.9, 10)]))  # fmt: skip
    b = pd.DataFrame(_rows("regularization", "none", 0, [("train_eval_loss", 1.0, 0), ("train_eval_loss", 0.6, 10),
                     ("train_eval_loss", 0.4, 20), ("test_acc", 0.5, 0), ("test_acc", 0.7, 10),
                     ("test_acc", 0.8, 20)]))  # fmt: skip
    level, acc_a, acc_b = matched_loss_accuracy(a, b)
    assert level == 0.4  # the lowest loss both reach
    assert acc_a == pytest.approx(0.5 + 0.4 * 0.75) and acc_b == pytest.approx(0.8)  # a crosses 0.4 at step 7.5


def test_regularization_rows_per_weight_decay():
    rows = []
    for seed in range(3):
        for wd in (0.0, 5e-4):
            for norm, dropout, end_acc in (("none", 0.0, 0.90), ("eager", 0.0, 0.95), ("none", 0.5, 0.93),
                                           ("eager", 0.5, 0.95)):  # fmt: skip
                acc = end_acc + 0.001 * seed
                rows += _rows("regularization", norm, seed, [("train_eval_loss", 1.0, 0), ("train_eval_loss", 0.1, 10),
                              ("test_acc", 0.5, 0), ("test_acc", acc, 10)], dropout=dropout, wd=wd)  # fmt: skip
    table = verdict_rows(pd.DataFrame(rows))
    assert _row(table, "BN regularises", "weight decay 0.0005")["verdict"] == "holds"
    assert _row(table, "Dropout regularises", "weight decay 0,")["verdict"] == "holds"
    assert _row(table, "Dropout still helps on top of BN", "weight decay 0,")["verdict"] == "tie"


def _fused(delta, backend="triton"):
    rows = []
    for seed in (0, 1):
        for norm in ("eager", "fused"):
            d = delta if norm == "fused" else 0.0
            rows += _rows("fused-vs-eager", norm, seed, [("train_loss", 1.0 + d, 10), ("test_acc", 0.5 + d, 10),
                          ("ms_per_step", 2.0 + 0.1 * seed if norm == "eager" else 1.0, 10)],
                          activation="relu", backend=backend if norm == "fused" else "torch")  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("delta", "backend", "same", "faster"),
    [(0.0, "triton", "holds", "holds"), (0.5, "triton", "opposite", "holds"),
     (0.0, "triton-interpreter", "holds", "inconclusive"), (0.0, "torch", "inconclusive", "inconclusive")],
)  # fmt: skip
def test_fused_agreement_is_per_evaluation(delta, backend, same, faster):
    table = verdict_rows(_fused(delta, backend))
    assert _row(table, "The fused layer trains like eager BN")["verdict"] == same
    assert _row(table, "The fused layer makes training faster")["verdict"] == faster
