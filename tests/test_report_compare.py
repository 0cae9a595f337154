"""Baseline vs candidate: labels on constructed points, regressions, missing points, the exit-code predicate."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.figure import Figure

from bnbench.report.compare import compare_runs, compare_sections, compare_summary, has_regression, regressions
from bnbench.report.compare_plots import compare_figures
from bnbench.report.testing import synthetic_bench


@pytest.fixture
def base() -> pd.DataFrame:
    # two points (eager, triton) of one case: enough to set each point's band by hand
    return synthetic_bench(
        providers=("eager", "triton"), dtypes=("fp32",), passes=("fwd",), batches=(256,), widths=(64,)
    )


def _with_triton_times(frame: pd.DataFrame, p20: float, p50: float, p80: float) -> pd.DataFrame:
    out = frame.copy()
    out.loc[out["provider"] == "triton", ["ms_p20", "ms_p50", "ms_p80"]] = [p20, p50, p80]
    return out


def _triton(comparison: pd.DataFrame) -> pd.Series:
    return comparison[comparison["provider"] == "triton"].iloc[0]


@pytest.mark.parametrize(
    ("baseline", "candidate", "label", "regression"),
    [
        # 20% slower, tight bands that do not overlap: a regression
        ((0.99, 1.0, 1.01), (1.19, 1.2, 1.21), "slower", True),
        # 20% slower in the median, but each median inside the other's wide band: run-to-run noise
        ((0.7, 1.0, 1.4), (0.9, 1.2, 1.5), "same", False),
        # 5% slower outside the noise: slower, but under the 10% threshold, so not a regression
        ((0.99, 1.0, 1.01), (1.04, 1.05, 1.06), "slower", False),
        # 20% faster outside the noise
        ((0.99, 1.0, 1.01), (0.79, 0.8, 0.81), "faster", False),
        # bands overlap but the candidate's median is outside the baseline's band: cannot tell
        ((0.98, 1.0, 1.02), (1.0, 1.2, 1.4), "ambiguous", False),
    ],
)
def test_labels_on_constructed_points(base, baseline, candidate, label, regression):
    comparison = compare_runs(_with_triton_times(base, *baseline), _with_triton_times(base, *candidate))
    row = _triton(comparison)
    assert row["label"] == label
    assert bool(row["regression"]) is regression
    assert row["ratio"] == pytest.approx(candidate[1] / baseline[1])
    assert row["ratio_lo"] == pytest.approx(candidate[0] / baseline[2])
    assert row["ratio_hi"] == pytest.approx(candidate[2] / baseline[0])
    assert has_regression(comparison) is regression


def test_threshold_decides_the_regression(base):
    slow = _with_triton_times(base, 1.19, 1.2, 1.21)
    fast = _with_triton_times(base, 0.99, 1.0, 1.01)
    assert has_regression(compare_runs(fast, slow, threshold=0.10))
    assert not has_regression(compare_runs(fast, slow, threshold=0.25))
    with pytest.raises(ValueError, match="threshold"):
        compare_runs(fast, slow, threshold=-0.1)


def test_comparing_a_run_with_itself_is_all_same():
    run = synthetic_bench()
    comparison = compare_runs(run, run)
    assert (comparison["label"] == "same").all()
    assert not has_regression(comparison)
    assert (comparison["ratio"] == 1.0).all()


def test_missing_points_are_reported_not_dropped(base):
    candidate = base[base["provider"] != "triton"]
    extra = base[base["provider"] == "triton"].assign(N=512, shape="512x64")
    comparison = compare_runs(base, pd.concat([candidate, extra]))
    missing = comparison[comparison["label"] == "missing"]
    assert sorted(missing["note"]) == ["only in the baseline", "only in the candidate"]
    assert len(comparison) == 3  # eager matched, the two triton points each reported once
    assert not has_regression(comparison)
    summary = compare_summary(comparison)
    assert summary.set_index("provider").loc["triton", "missing"] == 2
    titles = [s.title for s in compare_sections(comparison, base, candidate, threshold=0.1)]
    assert "Missing points" in titles


def test_a_newly_incorrect_point_is_a_regression(base):
    candidate = base.copy()
    candidate.loc[candidate["provider"] == "triton", "status"] = "incorrect"
    comparison = compare_runs(base, candidate)
    assert _triton(comparison)["label"] == "not-ok"
    assert has_regression(comparison)
    assert regressions(comparison)["status_cand"].tolist() == ["incorrect"]
    # an already-broken point that stays broken is reported but is not a new regression
    assert not has_regression(compare_runs(candidate, candidate))


def test_interpreter_points_are_never_compared_by_time(base):
    run = base.assign(timer="interpreter")
    slow = _with_triton_times(run, 10.0, 20.0, 30.0)
    comparison = compare_runs(run, slow)
    assert set(comparison["label"]) == {"untimed"}
    assert comparison["ratio"].isna().all()
    assert not has_regression(comparison)


def test_duplicate_points_are_rejected(base):
    with pytest.raises(ValueError, match="candidate: 2 rows share a point key"):
        compare_runs(base, pd.concat([base, base[base["provider"] == "triton"]]))


def test_different_devices_are_called_out(base):
    other = base.assign(device_name="NVIDIA H100 80GB HBM3")
    comparison = compare_runs(base, other)
    texts = [
        getattr(item, "text", "") for s in compare_sections(comparison, base, other, threshold=0.1) for item in s.items
    ]
    assert any("different devices" in t for t in texts)


def test_compare_figure_marks_regressions(base):
    comparison = compare_runs(_with_triton_times(base, 0.99, 1.0, 1.01), _with_triton_times(base, 1.19, 1.2, 1.21))
    figures = compare_figures(comparison, threshold=0.1, title="H200")
    assert isinstance(figures["compare_ratio"], Figure)
    ax = figures["compare_ratio"].axes[0]
    assert "fp32" in ax.get_title() and "fwd" in ax.get_title()
    assert "regression" in ax.get_legend_handles_labels()[1]
    untimed = compare_runs(base.assign(timer="interpreter"), base.assign(timer="interpreter"))
    assert compare_figures(untimed, threshold=0.1) == {}
