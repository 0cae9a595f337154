"""Tiny runs of every experiment (seconds each) through the same path the CLI takes, and the verdict table."""

from __future__ import annotations

import pandas as pd
import pytest

from bnbench.report.verdicts import verdict_rows
from bnbench.schema import TRAIN_COLUMNS
from bnbench.train.experiments import build_configs, run_configs
from bnbench.train.loop import RunConfig
from bnbench.train.presets import EXPERIMENTS, PRESETS

#: the smallest settings that still exercise every probe: 2 seeds (a verdict needs a pair), a few steps
_TINY = {"steps": 12, "eval_every": 6, "width": 8}
_TINY_SWEEP = {"depth": {"depths": (2, 3), "activations": ("sigmoid",)}, "lr": {"lrs": (0.1, 100.0)}}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_tiny(experiment):
    overrides = _TINY | _TINY_SWEEP.get(experiment, {})
    if experiment == "fused-vs-eager":
        overrides |= {"models": ("mlp",), "steps": 4, "eval_every": 2, "batch_size": 16}
    configs, _ = build_configs(experiment, "quick", seeds=2, device="cpu", overrides=overrides, interpreter=True)
    result = run_configs(configs)
    frame = result.frame
    assert not result.failures
    assert set(TRAIN_COLUMNS) <= set(frame.columns)
    assert set(frame["experiment"]) == {experiment} and set(frame["seed"]) == {0, 1}
    assert {"train_loss", "test_acc"} <= set(frame["metric"])
    verdicts = verdict_rows(frame)
    assert len(verdicts) >= 1 and set(verdicts["experiment"]) == {experiment}
    assert all(h in (True, False, None) for h in verdicts["held"])
    if experiment == "ics":
        assert frame["metric"].str.startswith("ics_cos/").any()
    if experiment == "fused-vs-eager":
        assert set(frame.loc[frame["norm"] == "fused", "backend"]) == {"triton-interpreter"}


def test_same_seed_same_numbers():
    configs, _ = build_configs("bn-paper", "quick", seeds=1, device="cpu", overrides=_TINY)
    a, b = run_configs(configs).frame, run_configs(configs).frame
    keep = ~a["metric"].isin(("ms_per_step", "time_to_target_s"))
    pd.testing.assert_frame_equal(a[keep].drop(columns="wall_s"), b[keep].drop(columns="wall_s"))


def test_overrides_and_grid():
    configs, spec = build_configs(
        "depth", "quick", seeds=2, device="cpu", overrides={"depths": [2, 4], "activations": ["tanh"], "width": 5}
    )
    assert len(configs) == 2 * 1 * 2 * 2  # depths x activations x norms x seeds
    assert {c.width for c in configs} == {5} and {c.depth for c in configs} == {2, 4}
    assert spec["target_acc"] == 0.93  # digits' default target
    quick_paper, _ = build_configs("bn-paper", "quick", seeds=3, device="cpu")
    assert {(c.depth, c.width, c.activation, c.batch_size) for c in quick_paper} == {(3, 100, "sigmoid", 60)}
    assert {c.norm for c in quick_paper} == {"none", "eager"}
    assert PRESETS["full"]["bn-paper"]["steps"] > PRESETS["quick"]["bn-paper"]["steps"]


def test_fused_vs_eager_on_cpu_is_tiny_under_the_interpreter():
    configs, _ = build_configs("fused-vs-eager", "full", seeds=1, device="cpu", interpreter=True)
    assert max(c.width for c in configs) <= 16 and max(c.steps for c in configs) <= 40


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"experiment": "bn-paper", "preset": "huge"}, "unknown preset"),
        ({"experiment": "dropout", "preset": "quick"}, "unknown experiment"),
        ({"experiment": "bn-paper", "preset": "quick", "seeds": 0}, "seeds"),
        ({"experiment": "bn-paper", "preset": "quick", "overrides": {"colour": 1}}, "unknown setting"),
        ({"experiment": "fused-vs-eager", "preset": "quick", "overrides": {"norms": ["eager"]}}, "lacks fused"),
    ],
)
def test_build_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_configs(**({"seeds": 1, "device": "cpu"} | kwargs))


def test_a_failing_run_is_recorded_and_the_rest_go_on():
    good = RunConfig("bn-paper", "digits", depth=2, width=4, steps=4, eval_every=2)
    bad = RunConfig("bn-paper", "digits", depth=2, width=4, steps=4, eval_every=2, activation="swish")
    result = run_configs([bad, good])
    assert len(result.failures) == 1 and "swish" in result.failures[0]["error"]
    failed = result.frame[result.frame["metric"] == "failed"]
    assert len(failed) == 1 and failed["activation"].item() == "swish"
    assert (result.frame["metric"] == "test_acc").sum() == 3  # the good run: steps 0, 2, 4
