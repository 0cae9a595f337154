"""The compare gate (nothing in common or missing points do not pass) and the machine check before regressions."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bnbench import _io
from bnbench.cli import main
from bnbench.report.compare import compare_runs, gate_failures
from bnbench.report.machine import check_machines, run_machine
from bnbench.report.testing import synthetic_bench


def _run(**kwargs) -> pd.DataFrame:
    return synthetic_bench(dtypes=("fp32",), passes=("fwd",), **kwargs)


def _folder(path, frame, meta=None):
    _io.write_csv(path / "results.csv", frame)
    if meta is not None:
        _io.write_json(path / "results.json", meta)
    return path


def _machine(gbps: float, spread: float = 0.02, **gpu) -> dict:
    state = {"utc": "2026-12-01T08:00:00+00:00", "device_type": "cpu",
             "copy": {"gbps": gbps, "gbps_lo": gbps * (1 - spread), "gbps_hi": gbps * (1 + spread)}}  # fmt: skip
    if gpu:
        state["gpu"] = gpu
    return {"machine": {"before": state, "after": state}}


# --- the gate ---------------------------------------------------------------------------------------------------


def test_nothing_in_common_does_not_pass(tmp_path, capsys):
    base = _run()
    other = base.assign(N=base["N"] + 1, shape=base["shape"] + "-other")
    comparison = compare_runs(base, other)
    assert not comparison["regression"].any()  # no point regressed ...
    assert any("share no point" in f for f in gate_failures(comparison))  # ... and yet nothing passed
    a, b = _folder(tmp_path / "a", base), _folder(tmp_path / "b", other)
    assert main(["report", "--baseline", str(a), "--candidate", str(b), "--out", str(tmp_path / "o")]) == 1
    assert "does not pass: the runs share no point" in capsys.readouterr().err


def test_points_missing_from_the_candidate_do_not_pass(tmp_path):
    base = _run()
    partial = base.iloc[:3]
    assert gate_failures(compare_runs(base, partial)) == [
        f"{len(base) - 3} point(s) of the baseline are missing from the candidate"
    ]
    # extra points in the candidate are reported, but the baseline was fully measured: it passes
    assert gate_failures(compare_runs(partial, base)) == []
    a, b = _folder(tmp_path / "a", base), _folder(tmp_path / "b", partial)
    assert main(["report", "--baseline", str(a), "--candidate", str(b), "--out", str(tmp_path / "o")]) == 1
    assert main(["report", "--baseline", str(b), "--candidate", str(a), "--out", str(tmp_path / "o2")]) == 0


# --- the machine check ------------------------------------------------------------------------------------------


def _slowed(frame: pd.DataFrame, factor: float) -> pd.DataFrame:
    out = frame.copy()
    out[["ms_p20", "ms_p50", "ms_p80"]] *= factor
    return out


def test_a_slower_machine_alone_is_not_a_regression(tmp_path, capsys):
    base = _run()
    slow = _slowed(base, 1.8)  # every point 80% slower ...
    a = _folder(tmp_path / "a", base, _machine(10.0))
    b = _folder(tmp_path / "b", slow, _machine(5.0))  # ... on a machine whose copy bandwidth halved
    out = tmp_path / "o"
    assert main(["report", "--baseline", str(a), "--candidate", str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "machine changed between the runs: copy bandwidth 10 GB/s" in text
    comparison = pd.read_csv(out / "comparison.csv")
    assert set(comparison["label"]) == {"slower"} and not comparison["regression"].any()
    assert comparison["note"].str.contains("within the machine change").all()
    summary = (out / "summary.md").read_text()
    assert "The machine changed between the runs" in summary and "Machine state of each run" in summary


def test_a_slowdown_beyond_the_machine_change_is_still_a_regression(tmp_path):
    base = _run()
    a = _folder(tmp_path / "a", base, _machine(10.0))
    b = _folder(tmp_path / "b", _slowed(base, 3.0), _machine(5.0))
    assert main(["report", "--baseline", str(a), "--candidate", str(b), "--out", str(tmp_path / "o")]) == 1


def test_the_same_machine_within_its_noise_changes_nothing(tmp_path):
    base = _run()
    a = _folder(tmp_path / "a", base, _machine(10.0, spread=0.1))
    b = _folder(tmp_path / "b", _slowed(base, 1.5), _machine(9.5, spread=0.1))  # bands overlap
    check = check_machines(run_machine(base, json.loads((a / "results.json").read_text())),
                           run_machine(base, json.loads((b / "results.json").read_text())))  # fmt: skip
    assert not check.differs and check.slowdown == 1.0
    assert main(["report", "--baseline", str(a), "--candidate", str(b), "--out", str(tmp_path / "o")]) == 1


@pytest.mark.parametrize(
    ("base_gpu", "cand_gpu", "reason"),
    [
        ({"sm_clock_mhz": 1980}, {"sm_clock_mhz": 1500}, "SM clock 1980 MHz in the baseline vs 1500 MHz"),
        ({"throttle_reasons": []}, {"throttle_reasons": ["hw_thermal"]}, "GPU throttling: baseline none, candidate hw_thermal"),
    ],
)  # fmt: skip
def test_gpu_clocks_and_throttling_are_machine_changes(base_gpu, cand_gpu, reason):
    frame = _run()
    check = check_machines(
        run_machine(frame, _machine(4000.0, **base_gpu)), run_machine(frame, _machine(4000.0, **cand_gpu))
    )
    assert check.differs and any(reason in r for r in check.reasons)


def test_older_results_fall_back_to_the_copy_samples_or_the_column():
    frame = _run()
    samples = {"copy_bandwidth": {"samples_ms": [10.0, 10.5, 11.0], "nbytes_each_way": 64 << 20}}
    from_samples = run_machine(frame, samples)
    assert from_samples.has_band and "samples" in from_samples.source
    assert from_samples.copy_lo < from_samples.copy_gbps < from_samples.copy_hi
    column = run_machine(frame, {})
    assert column.source == "peak_copy_gbps column" and column.copy_gbps == 4270.0
    other = run_machine(frame.assign(peak_copy_gbps=2000.0), {})
    check = check_machines(column, other)
    assert check.differs and check.slowdown == pytest.approx(4270.0 / 2000.0)


def test_the_comparison_says_how_complete_each_run_is(tmp_path):
    base = _run()
    a = _folder(tmp_path / "a", base, {"run": {"state": "complete", "points_planned": len(base)}})
    b = _folder(tmp_path / "b", base.iloc[:2], {"run": {"state": "interrupted", "points_planned": len(base)}})
    assert main(["report", "--baseline", str(a), "--candidate", str(b), "--out", str(tmp_path / "o")]) == 1
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert f"Baseline: Complete: all {len(base)} planned point(s)" in summary
    assert f"Candidate: INCOMPLETE: 2 of {len(base)} planned point(s) are recorded; the run was interrupted" in summary


def test_a_resumed_run_spans_the_machines_of_all_its_sessions():
    frame = _run()
    meta = _machine(10.0)
    meta["previous_runs"] = [{"run_id": "r", **_machine(5.0)}]  # the first session ran on a slower machine
    machine = run_machine(frame, meta)
    assert machine.copy_lo == pytest.approx(5.0 * 0.98) and machine.copy_hi == pytest.approx(10.0 * 1.02)
