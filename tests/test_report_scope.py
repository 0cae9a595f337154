"""What a summary says about its run: completeness, one environment table, a CPU run's scope, every point."""

from __future__ import annotations

import pandas as pd
import pytest

from bnbench import _io
from bnbench.report import bench, scope
from bnbench.report.assemble import results_report
from bnbench.report.document import Table, Text
from bnbench.report.load import load_result, newest_gpu_reference
from bnbench.report.testing import synthetic_bench


def _cpu_run() -> pd.DataFrame:
    """eager and compile timed on a CPU (compile slower, as it is there), triton checked in the interpreter."""
    frame = synthetic_bench(providers=("eager", "compile", "triton"), dtypes=("fp32",), passes=("fwd",),
                            timer="wall", device="Intel(R) Xeon(R) Processor", copy_gbps=10.0)  # fmt: skip
    compile_rows = frame["provider"] == "compile"
    frame.loc[compile_rows, ["ms_p20", "ms_p50", "ms_p80"]] *= 15
    frame.loc[compile_rows, "speedup_vs_eager"] = 1 / 15
    triton = frame["provider"] == "triton"
    frame.loc[triton, ["timer", "ms_p20", "ms_p50", "ms_p80", "speedup_vs_eager", "speedup_vs_compile"]] = [
        "interpreter", float("nan"), float("nan"), float("nan"), float("nan"), float("nan")]  # fmt: skip
    frame.loc[triton, "max_rel_err"] = 3e-7
    return frame.assign(peak_mem_mb=float("nan"))


def _texts(sections) -> str:
    return "\n".join(i.text for s in sections for i in s.items if isinstance(i, Text))


@pytest.mark.parametrize(
    ("rows", "run", "expected"),
    [
        (12, {"state": "complete", "points_planned": 12}, "Complete: all 12 planned point(s) are recorded."),
        (1, {"state": "interrupted", "points_planned": 12},
         "INCOMPLETE: 1 of 12 planned point(s) are recorded; the run was interrupted."),
        (3, {"state": "running", "points_planned": 12}, "INCOMPLETE: 3 of 12 planned point(s) are recorded; the run "
         "did not finish (it was killed, or it is still running)."),
        (5, {"state": "complete", "points_planned": 12}, "INCOMPLETE: 5 of 12 planned point(s) are recorded; "
         "results.json says the run completed, so results.csv has lost rows."),
        (12, {}, "Completeness not recorded"),
    ],
)  # fmt: skip
def test_completeness_is_said(rows, run, expected):
    frame = synthetic_bench(dtypes=("fp32",), passes=("fwd",), providers=("eager", "compile"))
    assert expected in scope.completeness(frame.iloc[:rows], {"run": run})


def test_one_environment_table_with_the_sidecar_fields_once():
    frame = synthetic_bench(dtypes=("fp32",), passes=("fwd",))
    meta = {"environment": {"torch_version": "2.11.0", "python_version": "3.12.1", "device": {"name": "X", "cores": 8}}}
    table = bench.environment_table(frame, meta)
    assert table["field"].is_unique
    assert {"python_version", "device.cores"} <= set(table["field"]) and "device.name" not in set(table["field"])
    sections = bench.bench_sections(frame, meta=meta)
    assert [s.title for s in sections].count("Environment") == 1
    assert not any("results.json" in s.title for s in sections)


def test_a_cpu_run_says_what_it_can_and_cannot_show():
    sections = bench.bench_sections(_cpu_run(), meta={"run": {"state": "complete", "points_planned": 18}})
    scope = next(s for s in sections if s.title == "What this run can and cannot show")
    text = _texts([scope])
    assert "Kernel timings need a GPU" in text
    assert "ran in the Triton interpreter on 6 point(s) and matched the float64 reference on 6" in text
    assert "timed with autograd on" in text  # why compile is slower here
    assert "GPU results: none are committed under reports/ yet" in text
    assert "Peak memory (peak_mem_mb) is measured with CUDA's allocator only" in text
    # a GPU run has no such section
    assert not any(s.title == scope.title for s in bench.bench_sections(synthetic_bench()))


def test_a_cpu_run_quotes_the_newest_committed_gpu_results(tmp_path):
    for name, stamp in (("h200-old", "2026-11-01T00:00:00+00:00"), ("h200-new", "2026-11-30T00:00:00+00:00")):
        _io.write_csv(tmp_path / "bench" / name / "results.csv", synthetic_bench().assign(timestamp_utc=stamp))
    _io.write_csv(tmp_path / "bench" / "cpu" / "results.csv", _cpu_run())  # a CPU run is no GPU reference
    (tmp_path / "bench" / "broken").mkdir()
    (tmp_path / "bench" / "broken" / "results.csv").write_text("run_id\n1,2\n")
    gpu = newest_gpu_reference([tmp_path])
    assert gpu.folder.endswith("h200-new") and gpu.device == "NVIDIA H200" and gpu.date.startswith("2026-11-30")
    items = scope.cpu_scope_items(_cpu_run(), gpu)
    assert any(isinstance(i, Text) and "Newest committed GPU results: NVIDIA H200, 2026-11-30" in i.text for i in items)
    assert any(isinstance(i, Table) and "geomean_vs_eager" in i.frame.columns for i in items)
    assert newest_gpu_reference([tmp_path / "bench" / "cpu"]) is None


def test_the_page_has_every_point_and_drops_an_empty_memory_column(tmp_path):
    _io.write_csv(tmp_path / "run" / "results.csv", _cpu_run())
    report = results_report([load_result(tmp_path / "run")])
    points = next(s for s in report.sections if s.title == "All points")
    table = next(i.frame for i in points.items if isinstance(i, Table))
    assert len(table) == len(_cpu_run()) and "peak_mem_mb" not in table.columns
    assert set(report.attachments) == {"run-results.csv"}
