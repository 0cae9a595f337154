"""Tiny runs of every experiment (seconds each) through the same path the CLI takes, the presets, the run order,
and the verdict table each experiment feeds."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from bnbench.report.verdicts import verdict_rows
from bnbench.schema import TRAIN_COLUMNS
from bnbench.train.experiments import build_configs, run_configs
from bnbench.train.loop import ARM_COLUMNS, RunConfig
from bnbench.train.presets import EXPERIMENTS, PRESETS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: the smallest settings that still exercise every probe: 2 seeds (a verdict needs a pair), a few steps, digits
_TINY = {"steps": 12, "eval_every": 6, "width": 8, "datasets": ("digits",)}
_TINY_SWEEP = {
    "bn-paper": {"lrs": (0.1, 1.0)},
    "depth": {"depths": (2, 3), "activations": ("sigmoid",)},
    "lr": {"lrs": (0.1, 1.0, 100.0)},
    "saturation": {"activations": ("sigmoid",)},
    "batch-size": {"batch_sizes": (30, 60), "norms": ("none", "eager", "groupnorm"), "steps": None},
    "fused-vs-eager": {"models": ("mlp",), "steps": 4, "eval_every": 2, "batch_sizes": (16,)},
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_tiny(experiment):
    overrides = _TINY | _TINY_SWEEP.get(experiment, {})
    configs, _ = build_configs(experiment, "quick", seeds=2, device="cpu", overrides=overrides, interpreter=True)
    result = run_configs(configs)
    frame = result.frame
    assert not result.failures and not result.interrupted and result.runs_done == len(configs)
    assert set(TRAIN_COLUMNS) <= set(frame.columns) and set(ARM_COLUMNS) <= set(frame.columns)
    assert set(frame["experiment"]) == {experiment} and set(frame["seed"]) == {0, 1}
    assert {"train_loss", "test_acc", "val_acc"} <= set(frame["metric"])
    verdicts = verdict_rows(frame)
    assert len(verdicts) >= 1 and set(verdicts["experiment"]) == {experiment}
    assert set(verdicts["verdict"]) <= {"holds", "opposite", "tie", "inconclusive"}
    assert all(h in (True, False, None) for h in verdicts["held"])
    metrics = set(frame["metric"])
    expected = {"ics": "ics_rel/layer2", "santurkar": "smooth_beta", "saturation": "saturated/layer1",
                "batch-size": "test_acc_batch", "depth": "grad_norm/layer1", "bn-paper": "pct50/layer3.unit0"}  # fmt: skip
    if experiment in expected:
        assert expected[experiment] in metrics
    if experiment == "fused-vs-eager":
        assert set(frame.loc[frame["norm"] == "fused", "backend"]) == {"triton-interpreter"}
    if experiment == "regularization":
        assert set(frame["dropout"]) == {0.0, 0.5} and set(frame["weight_decay"]) == {0.0, 5e-4}


def test_same_seed_same_numbers():
    configs, _ = build_configs("bn-paper", "quick", seeds=1, device="cpu", overrides=_TINY | {"lrs": (0.1,)})
    a, b = run_configs(configs).frame, run_configs(configs).frame
    keep = ~a["metric"].isin(("ms_per_step", "time_to_target_s"))
    pd.testing.assert_frame_equal(a[keep].drop(columns="wall_s"), b[keep].drop(columns="wall_s"))


def test_run_order_interleaves_the_arms():
    """Seed by seed, and the arms of one configuration back to back: paired runs see the same machine load."""
    configs, _ = build_configs("bn-paper", "quick", seeds=2, device="cpu")
    keys = [(c.seed, c.lr, c.norm) for c in configs]
    assert keys[:4] == [(0, 0.1, "none"), (0, 0.1, "eager"), (0, 0.3, "none"), (0, 0.3, "eager")]
    assert [k[0] for k in keys] == sorted(k[0] for k in keys)


def test_overrides_and_grid():
    configs, spec = build_configs(
        "depth", "quick", seeds=2, device="cpu", overrides={"depths": [2, 4], "activations": ["tanh"], "width": 5}
    )
    assert len(configs) == 2 * 1 * 2 * 2  # depths x activations x norms x seeds
    assert {c.width for c in configs} == {5} and {c.depth for c in configs} == {2, 4}
    assert {c.target_acc for c in configs} == {0.93}  # digits' default target
    quick_paper, spec = build_configs("bn-paper", "quick", seeds=None, device="cpu")
    assert {(c.dataset, c.depth, c.width, c.activation, c.batch_size) for c in quick_paper} == {
        ("mnist5k", 3, 100, "sigmoid", 60)}  # fmt: skip
    assert {c.norm for c in quick_paper} == {"none", "eager"} and spec["seeds"] == PRESETS["quick"]["seeds"] >= 5
    assert len({c.lr for c in quick_paper}) >= 3  # a sweep: each arm at its best rate
    assert PRESETS["standard"]["seeds"] >= 5
    assert PRESETS["standard"]["bn-paper"]["steps"] > PRESETS["quick"]["bn-paper"]["steps"]


def test_presets_build_and_say_what_the_paper_says():
    for preset in PRESETS:
        for experiment in EXPERIMENTS:
            configs, _ = build_configs(experiment, preset, seeds=None, device="cpu", interpreter=True)
            assert configs, (preset, experiment)
    literal, _ = build_configs("paper-literal", "quick", seeds=1, device="cpu")
    assert {(c.dataset, c.depth, c.width, c.activation, c.batch_size, c.init, c.momentum) for c in literal} == {
        ("mnist5k-binary", 3, 100, "sigmoid", 60, "normal", 0.0)}  # fmt: skip
    depth, _ = build_configs("depth", "quick", seeds=1, device="cpu")
    assert {c.init for c in depth} == {"auto"}  # He for relu, Glorot for sigmoid and tanh
    santurkar, _ = build_configs("santurkar", "quick", seeds=1, device="cpu")
    assert {(c.norm, c.noise > 0) for c in santurkar} == {("none", False), ("eager", False), ("noisy", True)}


def test_fused_vs_eager_on_cpu_is_tiny_under_the_interpreter():
    configs, _ = build_configs("fused-vs-eager", "standard", seeds=1, device="cpu", interpreter=True)
    assert max(c.width for c in configs) <= 16 and max(c.steps for c in configs) <= 40


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"experiment": "bn-paper", "preset": "huge"}, "unknown preset"),
        ({"experiment": "dropout", "preset": "quick"}, "unknown experiment"),
        ({"experiment": "bn-paper", "preset": "quick", "seeds": 0}, "seeds"),
        ({"experiment": "bn-paper", "preset": "quick", "overrides": {"colour": 1}}, "unknown setting"),
        ({"experiment": "fused-vs-eager", "preset": "quick", "overrides": {"norms": ["eager"]}}, "lacks fused"),
        ({"experiment": "bn-paper", "preset": "quick", "overrides": {"momentum": -1}}, "momentum"),
        ({"experiment": "bn-paper", "preset": "quick", "overrides": {"depths": [0]}}, "depth"),
        ({"experiment": "bn-paper", "preset": "quick", "overrides": {"lrs": []}}, "empty"),
    ],
)
def test_build_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_configs(**({"seeds": 1, "device": "cpu"} | kwargs))


def test_a_failing_run_is_recorded_and_the_rest_go_on(monkeypatch):
    import bnbench.train.experiments as experiments

    good = RunConfig("bn-paper", "digits", depth=2, width=4, steps=4, eval_every=2)
    bad = RunConfig("bn-paper", "digits", depth=2, width=4, steps=4, eval_every=2, seed=7)
    real = experiments.train_run

    def flaky(cfg, data, progress=None):
        if cfg.seed == 7:
            raise IndexError("a run that breaks")
        return real(cfg, data, progress)

    monkeypatch.setattr(experiments, "train_run", flaky)
    result = run_configs([bad, good])
    assert len(result.failures) == 1 and "IndexError: a run that breaks" in result.failures[0]["error"]
    failed = result.frame[result.frame["metric"] == "failed"]
    assert len(failed) == 1 and failed["seed"].item() == 7
    assert sorted(result.frame.loc[result.frame["metric"] == "test_acc", "step"]) == [0, 1, 2, 4]


def test_an_interrupt_keeps_the_finished_runs():
    configs = [RunConfig("bn-paper", "digits", depth=2, width=4, steps=4, eval_every=2, seed=s) for s in (0, 1, 2)]
    calls = []

    def on_run(cfg):
        calls.append(cfg.seed)
        if cfg.seed == 2:
            raise KeyboardInterrupt

    result = run_configs(configs, on_run=on_run)
    assert result.interrupted and result.runs_done == 2 and set(result.frame["seed"]) == {0, 1}
