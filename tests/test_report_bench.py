"""Bench tables, the summary and the figures on synthetic result frames (bnbench.report.testing)."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from bnbench.report import bench, bench_plots, style
from bnbench.report.document import markdown_table
from bnbench.report.points import geomean, is_baseline, timed_points
from bnbench.report.testing import synthetic_bench
from bnbench.schema import BENCH_COLUMNS, validate_bench


@pytest.fixture
def frame() -> pd.DataFrame:
    # two dtypes x two passes x 3 batches x 2 widths x 3 providers: every grouping has more than one value
    return synthetic_bench()


def test_synthetic_frame_fits_the_schema(frame):
    validate_bench(frame, "synthetic")
    assert list(frame.columns) == list(BENCH_COLUMNS)


def test_geomean_ignores_nan_and_non_positive():
    assert geomean([2.0, 8.0, float("nan"), 0.0, -1.0]) == pytest.approx(4.0)
    assert math.isnan(geomean([float("nan")]))


@pytest.mark.parametrize(
    ("values", "expected"),
    [([True, False], [True, False]), (["True", "false"], [True, False]), ([1, 0], [True, False])],
)
def test_is_baseline_reads_every_csv_spelling(values, expected):
    assert is_baseline(pd.Series(values)).tolist() == expected


def test_is_baseline_rejects_other_values():
    with pytest.raises(ValueError, match="maybe"):
        is_baseline(pd.Series(["true", "maybe"]))


def test_headline_geomeans_match_a_direct_computation(frame):
    table = bench.headline_table(frame)
    # one row per dtype x pass x provider x timer
    assert len(table) == 2 * 2 * 3
    row = table[(table["dtype"] == "bf16") & (table["pass"] == "fwd_bwd") & (table["provider"] == "triton")].iloc[0]
    rows = frame[(frame["dtype"] == "bf16") & (frame["pass"] == "fwd_bwd") & (frame["provider"] == "triton")]
    assert row["points"] == len(rows) == 6
    assert row["geomean_vs_eager"] == pytest.approx(np.exp(np.log(rows["speedup_vs_eager"]).mean()))
    assert row["geomean_vs_compile"] == pytest.approx(np.exp(np.log(rows["speedup_vs_compile"]).mean()))
    assert row["min_vs_eager"] == pytest.approx(rows["speedup_vs_eager"].min())
    assert row["median_frac_copy_bw"] == pytest.approx(rows["frac_of_copy_bw"].median())
    # eager against itself is exactly 1
    eager = table[table["provider"] == "eager"]
    assert np.allclose(eager["geomean_vs_eager"], 1.0)
    # reading order: fp32 before bf16, fwd before fwd_bwd, eager before compile before triton
    assert table["dtype"].tolist()[:6] == ["fp32"] * 6
    assert table["provider"].tolist()[:3] == ["eager", "compile", "triton"]


def test_speed_tables_exclude_failed_and_interpreter_points(frame):
    frame = frame.copy()
    triton = frame.index[frame["provider"] == "triton"]
    # a fast but wrong point must not count as a speedup; an interpreter time means nothing
    frame.loc[triton[0], ["status", "speedup_vs_eager"]] = ["incorrect", 1000.0]
    frame.loc[triton[1], ["timer", "speedup_vs_eager"]] = ["interpreter", 1000.0]
    frame.loc[triton[2], ["status", "message"]] = ["error", "CUDA error: illegal address"]
    table = bench.headline_table(frame)
    assert table["geomean_vs_eager"].max() < 10
    assert len(timed_points(frame)) == len(frame) - 3
    bad = bench.not_ok_points(frame)
    assert sorted(bad["status"]) == ["error", "incorrect"]
    assert "CUDA error: illegal address" in bad["message"].tolist()
    text = bench.summary_markdown(frame)
    assert "1 error" in text and "1 incorrect" in text
    assert "Triton interpreter" in text and "excluded from every speed table" in text


def test_interpreter_only_run_has_no_speed_table_and_no_figures(frame):
    frame = frame.assign(timer="interpreter", speedup_vs_eager=np.nan, speedup_vs_compile=np.nan)
    assert bench.headline_table(frame).empty
    assert bench.bench_figures(frame) == {}
    text = bench.summary_markdown(frame)
    assert "No timed points" in text
    assert f"{len(frame)} point(s) ran under the Triton interpreter" in text


def test_extreme_points_rank_by_the_faster_baseline(frame):
    table = bench.extreme_points(frame, n=3)
    assert set(table["provider"]) == {"triton"}  # baselines are not ranked against themselves
    assert (table["rank"] == "best").sum() == 3 and (table["rank"] == "worst").sum() == 3
    triton = frame[frame["provider"] == "triton"]
    faster = np.minimum(triton["speedup_vs_eager"], triton["speedup_vs_compile"])
    assert table[table["rank"] == "worst"]["vs_faster_baseline"].iloc[0] == pytest.approx(faster.min())
    assert table[table["rank"] == "best"]["vs_faster_baseline"].iloc[0] == pytest.approx(faster.max())


def test_extreme_points_never_list_a_point_twice():
    # 3 points and n=5: split into best and worst instead of listing each point twice
    small = synthetic_bench(dtypes=("fp32",), passes=("fwd",), batches=(256, 512, 1024), widths=(64,))
    table = bench.extreme_points(small, n=5)
    assert len(table) == 3 and table["case"].is_unique


def test_points_over_copy_bandwidth_are_flagged(frame):
    frame = frame.copy()
    frame.loc[frame.index[0], "frac_of_copy_bw"] = 1.3
    over = bench.over_copy_bandwidth(frame)
    assert len(over) == 1
    assert "exceed 100% of the copy bandwidth" in bench.summary_markdown(frame)


def test_summary_names_the_environment_and_the_headline(frame):
    text = bench.summary_markdown(frame)
    for needle in ("NVIDIA H200", "0123456789ab", "4270", "geomean_vs_eager", "Best and worst points"):
        assert needle in text


def test_markdown_table_escapes_pipes_and_formats_numbers():
    text = markdown_table(pd.DataFrame({"a": ["x|y"], "b": [1.23456789], "c": [float("nan")]}))
    assert "x\\|y" in text and "1.235" in text
    assert text.splitlines()[2].endswith("|  |")


def test_bench_figures_draw_every_figure_with_data_and_no_pyplot_state(frame):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    figures = bench.bench_figures(frame)
    assert plt.get_fignums() == before
    assert set(figures) == {"time_vs_batch", "bandwidth", "speedup_vs_eager", "speedup_vs_compile"}
    assert all(isinstance(f, Figure) for f in figures.values())
    # one panel per dtype x pass x width (time), per dtype x pass (bandwidth, heatmaps + colour bars)
    assert len(figures["time_vs_batch"].axes) == 2 * 2 * 2
    assert len(figures["bandwidth"].axes) == 2 * 2
    titles = figures["time_vs_batch"].axes[0].get_title() + figures["time_vs_batch"].get_suptitle()
    assert "fp32" in titles and "fwd" in titles and "NVIDIA H200" in titles


def test_figures_without_a_compile_baseline_omit_its_heatmap():
    frame = synthetic_bench(providers=("eager", "triton"))
    assert "speedup_vs_compile" not in bench.bench_figures(frame)


def test_provider_colours_are_fixed_across_figures(frame):
    figures = bench.bench_figures(frame)
    line = next(ln for ln in figures["time_vs_batch"].axes[0].get_lines() if ln.get_label() == "triton")
    assert matplotlib.colors.to_hex(line.get_color()) == style.PROVIDER_COLORS["triton"]
    assert style.color_for("some-new-provider") == style.color_for("some-new-provider")
    assert style.NORM_COLORS["fused"] == style.PROVIDER_COLORS["triton"]


def test_plot_functions_take_an_ax_and_return_it(frame):
    timed = timed_points(frame)
    panel = timed[(timed["dtype"] == "fp32") & (timed["pass"] == "fwd")]
    fig = Figure()
    ax = fig.subplots()
    assert bench_plots.plot_time_vs_batch(ax, panel[panel["C"] == 64]) is ax
    assert ax.get_xscale() == "log"  # batches 256..65536 span decades
    ax = fig.add_subplot()
    assert bench_plots.plot_bandwidth(ax, panel, copy_gbps=[4270.0]) is ax
    assert any(ln.get_label().startswith("copy bandwidth") for ln in ax.get_lines())
    ax = fig.add_subplot()
    triton = panel[panel["provider"] == "triton"]
    assert bench_plots.plot_speedup_heatmap(ax, triton, "speedup_vs_eager") is ax
    assert ax.images[0].get_array().shape == (3, 2)  # batches x widths


def test_varying_case_dimensions_get_their_own_lines():
    # two activations in one panel must not be drawn as one zig-zag line
    a = synthetic_bench(providers=("eager",), dtypes=("fp32",), passes=("fwd",), widths=(64,))
    b = a.assign(activation="gelu", ms_p50=a["ms_p50"] * 1.1)
    fig = Figure()
    ax = bench_plots.plot_time_vs_batch(fig.subplots(), pd.concat([a, b]), extras=["activation"])
    assert sorted(ln.get_label() for ln in ax.get_lines()) == ["eager (gelu)", "eager (relu)"]


def test_heatmap_panels_of_one_figure_share_one_colour_scale(frame):
    figure = bench.bench_figures(frame)["speedup_vs_eager"]
    limits = {(im.norm.vmin, im.norm.vmax) for ax in figure.axes for im in ax.images}
    assert len(limits) == 1
    (vmin, vmax), *_ = limits
    assert vmin * vmax == pytest.approx(1.0)  # centred on a speedup of 1
    triton = frame[frame["provider"] == "triton"]
    assert vmax >= triton["speedup_vs_eager"].max() * 0.999  # no cell beyond the scale


def _labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


def test_every_panel_of_a_figure_has_the_same_axis_kinds():
    # width 64 swept over 256..65536 (decades), width 1024 only at 256 and 512: per-panel choices would mix
    wide = synthetic_bench(dtypes=("fp32",), passes=("fwd",), widths=(64,), batches=(256, 4096, 65536))
    narrow = synthetic_bench(dtypes=("fp32",), passes=("fwd",), widths=(1024,), batches=(256, 512))
    figures = bench.bench_figures(pd.concat([wide, narrow], ignore_index=True))
    for stem in ("time_vs_batch", "bandwidth"):
        axes = [ax for ax in figures[stem].axes if ax.get_label() != "<colorbar>"]
        assert len({(ax.get_xscale(), ax.get_yscale()) for ax in axes}) == 1, stem


def test_bn1d_and_bn2d_never_share_a_batch_axis():
    bn1d = synthetic_bench(dtypes=("fp32",), passes=("fwd",), widths=(64,))
    bn2d = bn1d.assign(op="bn2d", S=196, shape=bn1d["N"].astype(str) + "x64x14x14")
    figure = bench.bench_figures(pd.concat([bn1d, bn2d], ignore_index=True))["time_vs_batch"]
    titles = sorted(ax.get_title() for ax in figure.axes)
    assert len(titles) == 2 and titles[0].startswith("BN1d") and titles[1].startswith("BN2d")
    for ax in figure.axes:
        assert all("bn" not in line.get_label() for line in ax.get_lines())  # one op per panel: no op in labels


def test_a_swept_log_axis_is_labelled_at_its_values_only():
    frame = synthetic_bench(dtypes=("fp32",), passes=("fwd",), widths=(64,), batches=(256, 2048, 16384, 262144))
    ax = bench.bench_figures(frame)["time_vs_batch"].axes[0]
    ax.figure.canvas.draw()
    assert ax.get_xscale() == "log"
    assert _labels(ax.xaxis) == ["256", "2048", "16384", "262k"]
    assert not [t for t in ax.xaxis.get_minorticklabels() if t.get_text()]  # no crowded minor labels


def test_a_label_has_one_style_in_every_panel():
    # BN1d panels have only nchw; BN2d panels both layouts: "eager (nchw)" must look the same everywhere
    bn1d = synthetic_bench(providers=("eager",), dtypes=("fp32",), passes=("fwd",), widths=(64,))
    bn2d = bn1d.assign(op="bn2d", S=196)
    frame = pd.concat([bn1d, bn2d, bn2d.assign(layout="channels_last")], ignore_index=True)
    figure = bench.bench_figures(frame)["time_vs_batch"]
    styles: dict[str, set] = {}
    for ax in figure.axes:
        for line in ax.get_lines():
            styles.setdefault(line.get_label(), set()).add((line.get_marker(), line.get_linestyle()))
    assert set(styles) == {"eager (nchw)", "eager (channels_last)"}
    assert all(len(s) == 1 for s in styles.values()) and styles["eager (nchw)"] != styles["eager (channels_last)"]
