"""One training run: determinism, the recorded metrics, never-reached targets, divergence, the ICS probe, and
fused-vs-eager agreement with the Triton kernels in the interpreter (conftest sets TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from bnbench.train.data import load_dataset
from bnbench.train.ics import gradient_shift
from bnbench.train.loop import RUN_COLUMNS, RunConfig, backend_label, train_run
from bnbench.train.models import build_model, init_weights


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: timing columns and metrics: everything else must repeat exactly for the same seed
_TIMING = ("ms_per_step", "time_to_target_s")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def small_digits(digits):
    """200 training and 40 test images: the interpreter simulates every Triton program, so evaluations of the
    full test set would dominate the fused runs."""
    return dataclasses.replace(digits, x_train=digits.x_train[:200], y_train=digits.y_train[:200],
                               x_test=digits.x_test[:40], y_test=digits.y_test[:40])  # fmt: skip


def _cfg(**kw) -> RunConfig:
    """A few seconds at most: 3x16 sigmoid MLP, 30 steps, evaluations every 10."""
    base = {"experiment": "bn-paper", "dataset": "digits", "depth": 3, "width": 16, "steps": 30, "eval_every": 10,
            "target_acc": 0.5}  # fmt: skip
    return RunConfig(**(base | kw))


def _value(frame: pd.DataFrame, metric: str, step: int | None = None) -> float:
    sub = frame[frame["metric"] == metric]
    return float(sub["value"].iloc[-1] if step is None else sub[sub["step"] == step]["value"].item())


def test_deterministic_given_seed(digits):
    a, b = train_run(_cfg(norm="eager"), digits), train_run(_cfg(norm="eager"), digits)
    keep = ~a["metric"].isin(_TIMING)
    pd.testing.assert_frame_equal(a[keep].drop(columns="wall_s"), b[keep].drop(columns="wall_s"))
    other = train_run(_cfg(norm="eager", seed=1), digits)
    assert _value(other, "train_loss", 0) != _value(a, "train_loss", 0)


def test_columns_and_metrics(digits):
    frame = train_run(_cfg(norm="eager"), digits)
    assert list(frame.columns) == list(RUN_COLUMNS)
    metrics = set(frame["metric"])
    for m in ("train_loss", "test_acc", "train_acc", "train_eval_loss", "test_loss", "grad_norm/layer1",
              "grad_norm/layer4", "pct15/layer3.unit0", "pct85/layer3.unit0", "saturated/layer3", "steps_to_target",
              "diverged"):  # fmt: skip
        assert m in metrics, m
    assert "val_acc" not in metrics  # this data set has no validation split
    # log-spaced early evaluations, then every eval_every steps
    assert sorted(set(frame.loc[frame["metric"] == "test_acc", "step"])) == [0, 1, 4, 10, 20, 30]
    pct = {p: _value(frame, f"pct{p}/layer3.unit0", 30) for p in (15, 50, 85)}
    assert pct[15] <= pct[50] <= pct[85]
    wall = frame.loc[frame["metric"] == "test_acc", "wall_s"].to_numpy()
    assert (wall[1:] >= wall[:-1]).all() and wall[0] >= 0


def test_probe_every_thins_the_probes_not_the_curves(digits):
    frame = train_run(_cfg(norm="eager", probe_every=20), digits)
    steps = lambda m: sorted(set(frame.loc[frame["metric"] == m, "step"]))  # noqa: E731
    assert steps("test_acc") == [0, 1, 4, 10, 20, 30]
    assert steps("grad_norm/layer1") == steps("saturated/layer1") == steps("train_acc") == [0, 20, 30]
    every = train_run(_cfg(norm="eager", probe_every=20, probes=("train_eval",)), digits)
    assert sorted(set(every.loc[every["metric"] == "train_eval_loss", "step"])) == [0, 1, 4, 10, 20, 30]


def test_never_reached_target_is_marked_not_dropped(digits):
    frame = train_run(_cfg(norm="none", target_acc=1.0, steps=4), digits)
    assert math.isnan(_value(frame, "steps_to_target")) and _value(frame, "reached_target") == 0.0
    frame = train_run(_cfg(norm="eager", target_acc=1e-9), digits)
    assert _value(frame, "steps_to_target") == 0.0 and _value(frame, "reached_target") == 1.0


def test_steps_to_target_is_interpolated_between_evaluations(digits):
    frame = train_run(_cfg(norm="eager", lr=0.3), digits)
    acc = frame[frame["metric"] == "test_acc"].set_index("step")["value"]
    target = float((acc.iloc[2] + acc.iloc[-1]) / 2)
    frame = train_run(_cfg(norm="eager", lr=0.3, target_acc=target), digits)
    hit = int(acc.index[(acc >= target).to_numpy().argmax()])
    prev = int(acc.index[list(acc.index).index(hit) - 1])
    expected = prev + (target - acc[prev]) / (acc[hit] - acc[prev]) * (hit - prev)
    assert _value(frame, "steps_to_target") == pytest.approx(expected)
    assert prev < _value(frame, "steps_to_target") <= hit


def test_divergence_stops_the_run_and_is_recorded(digits):
    """An absurd rate on a ReLU net without BN overflows the loss; the run stops at that evaluation."""
    frame = train_run(_cfg(norm="none", activation="relu", lr=1e6, steps=200), digits)
    assert _value(frame, "diverged") == 1.0
    assert frame["step"].max() < 200


def test_ics_is_zero_when_earlier_layers_do_not_move():
    """With the earlier layers' step undone (before == after for them), G' == G: l2 shift 0, cosine 1; when they
    do move, the shift is positive."""
    torch.manual_seed(0)
    model = build_model("mlp", in_shape=(1, 4, 4), n_classes=10, depth=2, width=8, activation="tanh", norm="eager")
    init_weights(model, "xavier", 0)
    x, y = torch.rand(12, 1, 4, 4), torch.randint(0, 10, (12,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = [b.layer.weight.grad.clone() for b in model.blocks] + [model.head.weight.grad.clone()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shifts = gradient_shift(model, lambda: F.cross_entropy(model(x), y), before, before, grads)
    assert [s[0] for s in shifts] == [1, 2]
    for _, l2, rel, cos in shifts:
        assert l2 < 1e-6 and rel < 1e-5 and cos == pytest.approx(1.0, abs=1e-6)
    after = {k: (v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in before.items()}
    shifts = gradient_shift(model, lambda: F.cross_entropy(model(x), y), before, after, grads)
    assert all(l2 > 1e-4 and rel == pytest.approx(l2 / grads[i].norm().item(), rel=1e-4) for i, l2, rel, _ in shifts)
    for k, v in model.state_dict().items():  # left at "after"
        torch.testing.assert_close(v, after[k])


def test_ics_probe_in_a_run(digits):
    frame = train_run(_cfg(norm="eager", probes=("ics",), ics_every=5), digits)  # between evaluations too
    cos = frame[frame["metric"].str.startswith("ics_cos/")]
    assert set(cos["metric"]) == {"ics_cos/layer2", "ics_cos/layer3", "ics_cos/layer4"}
    assert sorted(set(cos["step"])) == [0, 5, 10, 15, 20, 25]  # the last step takes no update to measure
    assert ((cos["value"] > -1.0001) & (cos["value"] < 1.0001)).all()
    assert (frame[frame["metric"].str.startswith("ics_rel/")]["value"] >= 0).all()


def test_smoothness_probe_restores_the_model(digits):
    """The loss and gradient along the gradient direction: nonnegative, and measuring leaves the run unchanged
    (same curves as without the probe)."""
    plain = train_run(_cfg(norm="eager", activation="relu", probes=()), digits)
    probed = train_run(_cfg(norm="eager", activation="relu", probes=("smoothness",), ics_every=10), digits)
    smooth = probed[probed["metric"].str.startswith("smooth_")]
    assert set(smooth["metric"]) == {"smooth_loss_range", "smooth_grad_change", "smooth_beta"}
    assert (smooth["value"] >= 0).all() and sorted(set(smooth["step"])) == [0, 10, 20]
    curve = lambda f: f[f["metric"].isin(("test_acc", "train_loss"))]["value"].to_numpy()  # noqa: E731
    torch.testing.assert_close(torch.tensor(curve(probed)), torch.tensor(curve(plain)), rtol=1e-6, atol=1e-7)


def test_train_mode_accuracy_and_validation_split(digits):
    data = load_dataset("digits", val_fraction=0.1)
    frame = train_run(_cfg(norm="eager", batch_size=8, train_mode_eval=True, probe_every=30), data)
    assert {"val_acc", "test_acc_batch"} <= set(frame["metric"])
    assert sorted(set(frame.loc[frame["metric"] == "val_acc", "step"])) == [10, 20, 30]  # the last evaluations
    assert sorted(set(frame.loc[frame["metric"] == "test_acc_batch", "step"])) == [0, 30]
    none = train_run(_cfg(norm="none", train_mode_eval=True), data)
    assert "test_acc_batch" not in set(none["metric"])  # no batch statistics to use


def test_epochs_fix_the_length_from_the_data(digits):
    cfg = _cfg(norm="none", epochs=2, batch_size=100)
    n = len(digits.x_train)
    assert cfg.for_data(n).steps == 2 * (n // 100) and cfg.for_data(n).eval_every == 2 * (n // 100) // 10
    frame = train_run(cfg, digits)
    assert frame["step"].max() == 2 * (n // 100)


@pytest.mark.parametrize("model", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_fused_matches_eager_under_the_interpreter(small_digits, model):
    """Same seed and data: the fused layer's curves equal eager BN's (the kernels run in the interpreter here,
    natively on a GPU). Tiny sizes: width 8/4, a few steps; ReLU, the common case."""
    kw = {"experiment": "fused-vs-eager", "model": model, "depth": 2, "width": 8 if model == "mlp" else 4,
          "activation": "relu", "batch_size": 16, "steps": 6, "eval_every": 3, "probes": ()}  # fmt: skip
    eager, fused = (train_run(_cfg(norm=n, **kw), small_digits) for n in ("eager", "fused"))
    assert fused["backend"].iloc[0] == ("triton" if torch.cuda.is_available() else "triton-interpreter")
    assert eager["backend"].iloc[0] == "torch"
    for metric in ("train_loss", "test_loss", "test_acc"):
        e = eager[eager["metric"] == metric]["value"].to_numpy()
        f = fused[fused["metric"] == metric]["value"].to_numpy()
        torch.testing.assert_close(torch.tensor(f), torch.tensor(e), rtol=1e-4, atol=1e-5)


def test_backend_label_never_hides_the_fallback():
    assert backend_label(_cfg(norm="none")) == "none"
    assert backend_label(_cfg(norm="eager")) == "torch"
    assert backend_label(_cfg(norm="fused", backend="torch")) == "torch"


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"optimizer": "lbfgs"}, "optimizer"), ({"probes": ("hessian",)}, "probe"), ({"steps": 0}, "steps"),
     ({"lr": -1.0}, "lr"), ({"probe_unit": 16}, "probe_unit"), ({"momentum": -1.0}, "momentum"),
     ({"init_std": -1.0}, "init_std"), ({"target_acc": 2.0}, "target"), ({"depth": 0}, "depth"),
     ({"dropout": 1.0}, "dropout"), ({"weight_decay": -0.1}, "weight_decay"), ({"epochs": 0.0}, "epochs")],
)  # fmt: skip
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)
