"""The training report: verdicts computed from the data (constructed frames with a known answer), figures,
and summary.md's plain statements."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from matplotlib.figure import Figure

from bnbench.report.train import summary_markdown, train_figures, verdict_table
from bnbench.schema import validate_train


def _rows(experiment, norm, seed, metric_values, *, depth=3, activation="sigmoid", lr=0.1, step=100, backend=None):
    base = {"experiment": experiment, "dataset": "digits", "model": "mlp", "depth": depth, "width": 8,
            "activation": activation, "norm": norm, "lr": lr, "batch_size": 60, "seed": seed,
            "backend": backend or {"none": "none", "eager": "torch", "fused": "triton"}[norm]}  # fmt: skip
    return [base | {"step": s, "wall_s": s / 100, "metric": m, "value": v} for m, v, s in metric_values]


def _paper(bn_steps, plain_steps, bn_acc=0.97, plain_acc=0.95):
    """bn-paper results with the given steps to target per seed (None = never reached)."""
    rows = []
    for seed, (b, p) in enumerate(zip(bn_steps, plain_steps, strict=True)):
        for norm, steps, acc in (("eager", b, bn_acc), ("none", p, plain_acc)):
            rows += _rows("bn-paper", norm, seed, [
                ("steps_to_target", math.nan if steps is None else steps, 100), ("target_acc", 0.93, 100),
                ("test_acc", 0.1, 0), ("test_acc", acc, 100), ("train_acc", 1.0, 100), ("train_loss", 0.1, 100),
                ("pct15/layer3.unit0", -1.0, 50), ("pct85/layer3.unit0", 1.0, 50), ("pct50/layer3.unit0", 0.0, 50),
                ("pct15/layer3.unit0", -1.0 if norm == "eager" else -5.0, 100),
                ("pct85/layer3.unit0", 1.0, 100), ("pct50/layer3.unit0", 0.0 if norm == "eager" else -2.0, 100),
            ])  # fmt: skip
    return validate_train(pd.DataFrame(rows))


def _held(table, claim_start):
    row = table[table["claim"].str.startswith(claim_start)]
    assert len(row) == 1, (claim_start, list(table["claim"]))
    return row["held"].item()


def test_verdict_follows_the_data():
    assert _held(verdict_table(_paper([100, 200, 150], [400, 500, 450])), "BN trains in fewer steps") is True
    assert _held(verdict_table(_paper([500, 600, 550], [400, 500, 450])), "BN trains in fewer steps") is False
    assert _held(verdict_table(_paper([100, 600, 150], [400, 500, 450])), "BN trains in fewer steps") is None
    # a run that never reaches the target counts as slower, not as missing
    assert _held(verdict_table(_paper([100, 200], [None, None])), "BN trains in fewer steps") is True
    assert _held(verdict_table(_paper([None, None], [None, None])), "BN trains in fewer steps") is None
    assert _held(verdict_table(_paper([1], [2])), "BN trains in fewer steps") is None  # one seed: no verdict


def test_accuracy_gap_and_stability_claims():
    table = verdict_table(_paper([100, 200], [400, 500], bn_acc=0.94, plain_acc=0.96))
    assert _held(table, "BN reaches a higher test accuracy") is False
    assert _held(table, "BN regularises slightly") is False  # train acc 1.0 for both: BN's gap is larger
    assert _held(table, "BN keeps a layer's input distribution stable") is True  # the plain net's band moved
    assert "0.94" in table.loc[table["claim"].str.startswith("BN reaches"), "measured"].item()


def _depth_frame(plain_reaches_at_20: bool):
    rows = []
    for seed in (0, 1):
        for norm in ("none", "eager"):
            for depth in (2, 20):
                reached = norm == "eager" or depth == 2 or plain_reaches_at_20
                first = 1.0 if norm == "eager" else 1e-6 ** (depth / 20)
                rows += _rows("depth", norm, seed, [
                    ("reached_target", float(reached), 100), ("target_acc", 0.93, 100), ("test_acc", 0.95, 100),
                    ("steps_to_target", 50.0 if reached else math.nan, 100), ("train_loss", 0.1, 100),
                    ("grad_norm/layer1", first, 0), (f"grad_norm/layer{depth}", 1.0, 0),
                    ("saturated/layer1", 0.0 if norm == "eager" else 0.5, 100),
                ], depth=depth)  # fmt: skip
    return pd.DataFrame(rows)


def test_depth_claims():
    table = verdict_table(_depth_frame(plain_reaches_at_20=False))
    assert _held(table, "BN lets deep sigmoid networks train") is True
    assert _held(table, "BN eases vanishing gradients (sigmoid)") is True
    assert _held(table, "BN reduces saturation (sigmoid)") is True
    table = verdict_table(_depth_frame(plain_reaches_at_20=True))
    assert _held(table, "BN lets deep sigmoid networks train") is None  # nothing to rescue at these depths


def _fused_frame(delta: float, backend: str, acc_delta: float | None = None):
    """fused = eager + delta in loss and accuracy (accuracy: + acc_delta when given, seed spread 0.04)."""
    rows = []
    for seed in (0, 1):
        for norm in ("eager", "fused"):
            d = delta if norm == "fused" else 0.0
            a = (d if acc_delta is None else acc_delta) if norm == "fused" else 0.0
            rows += _rows("fused-vs-eager", norm, seed, [
                ("train_loss", 1.0 + d, 10), ("test_acc", 0.5 + 0.04 * seed + a, 10),
                ("ms_per_step", 2.0 if norm == "eager" else 1.0, 10),
            ], activation="relu", backend=backend if norm == "fused" else "torch")  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("delta", "backend", "same", "faster"),
    [(0.0, "triton", True, True), (0.5, "triton", False, True), (0.0, "triton-interpreter", True, None),
     (0.0, "torch", None, None)],
)  # fmt: skip
def test_fused_claims(delta, backend, same, faster):
    table = verdict_table(_fused_frame(delta, backend))
    assert _held(table, "The fused layer trains like eager BN") is same
    assert _held(table, "The fused layer makes training faster") is faster


@pytest.mark.parametrize(("acc_delta", "same"), [(0.03, True), (0.06, False)])
def test_fused_curves_that_drift_are_judged_by_the_outcome(acc_delta, same):
    """Losses 20% apart (beyond the per-evaluation tolerance): the claim then rests on the final accuracies,
    which must agree within the seed spread (0.04 here)."""
    table = verdict_table(_fused_frame(0.2, "triton", acc_delta))
    assert _held(table, "The fused layer trains like eager BN") is same


def test_figures_and_summary():
    df = pd.concat([_paper([100, 200], [400, 500]), _depth_frame(False), _fused_frame(0.0, "triton")])
    figures = train_figures(df)
    assert {"bn_paper_curves", "bn_paper_percentiles", "depth_sweep", "depth_grad_norms",
            "fused_vs_eager_curves"} <= set(figures)  # fmt: skip
    assert all(isinstance(f, Figure) and f.axes for f in figures.values())
    text = summary_markdown(_paper([500, 600], [400, 500]), {"preset": "quick", "device": "cpu"})
    assert "## Verdict" in text and 'Not confirmed here: "BN trains in fewer steps"' in text
