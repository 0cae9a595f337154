"""Results read whole or not at all, one writer per folder, and no command overwriting another's files."""

from __future__ import annotations

import math
import multiprocessing
import os

import pandas as pd
import pytest

from bnbench import _io
from bnbench.cli import main
from bnbench.report.load import load_result
from bnbench.report.testing import synthetic_bench


def _bench_folder(path, frame=None):
    _io.write_csv(path / "results.csv", synthetic_bench(dtypes=("fp32",), passes=("fwd",)) if frame is None else frame)
    return path


# --- reading whole ---------------------------------------------------------------------------------------------


def test_a_row_cut_mid_way_is_an_error_naming_file_and_line(tmp_path, capsys):
    folder = _bench_folder(tmp_path / "run")
    csv = folder / "results.csv"
    data = csv.read_bytes()
    csv.write_bytes(data[: len(data) - 40])  # the last row loses its tail, as a copy cut short would
    lines = data[: len(data) - 40].count(b"\n") + 1
    with pytest.raises(ValueError, match=rf"results.csv: line {lines}: \d+ field\(s\) where the header has"):
        load_result(folder)
    assert main(["report", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(csv) in err and f"line {lines}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_file_cut_inside_its_last_field_is_an_error(tmp_path):
    folder = _bench_folder(tmp_path / "run", synthetic_bench(dtypes=("fp32",), passes=("fwd",)).assign(message="x"))
    csv = folder / "results.csv"
    csv.write_bytes(csv.read_bytes()[:-1])  # the final line end is gone: every field is there, the last one may be cut
    with pytest.raises(ValueError, match=r"line 19: the last row has no line end: the file stops mid-row"):
        load_result(folder)


def test_a_row_with_missing_fields_inside_the_file_is_an_error(tmp_path):
    folder = _bench_folder(tmp_path / "run")
    csv = folder / "results.csv"
    lines = csv.read_text().splitlines(keepends=True)
    lines[2] = ",".join(lines[2].split(",")[:10]) + "\n"  # the second data row lost its other fields
    csv.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"line 3: 10 field\(s\) where the header has \d+"):
        load_result(folder)


@pytest.mark.parametrize(("column", "value"), [("ms_p20", -0.5), ("ms_p80", math.inf), ("ms_p50", 0.0)])
def test_negative_zero_or_infinite_times_are_rejected(tmp_path, column, value):
    frame = synthetic_bench(dtypes=("fp32",), passes=("fwd",))
    frame.loc[3, column] = value
    folder = _bench_folder(tmp_path / "run", frame)
    with pytest.raises(ValueError, match=rf"column {column} must be a finite time > 0 ms.*line 5"):
        load_result(folder)


def test_the_schema_check_itself_rejects_impossible_times():
    from bnbench.schema import validate_bench

    frame = synthetic_bench(dtypes=("fp32",), passes=("fwd",))
    validate_bench(frame)
    for column, value in (("ms_p20", -1.0), ("ms_p80", math.inf)):
        with pytest.raises(ValueError, match=rf"column {column} must be a finite time"):
            validate_bench(frame.assign(**{column: value}))


def test_a_whole_file_reads_back_equal(tmp_path):
    frame = synthetic_bench(dtypes=("fp32",), passes=("fwd",)).assign(message='a "quoted", comma message')
    folder = _bench_folder(tmp_path / "run", frame)
    back = load_result(folder).frame
    pd.testing.assert_series_equal(back["ms_p50"], frame["ms_p50"])
    assert (back["message"] == 'a "quoted", comma message').all()


# --- one writer per folder -------------------------------------------------------------------------------------


def _hold_lock(folder, ready, release):
    with _io.folder_lock(folder, "bnbench bench (test)"):
        ready.set()
        release.wait(30)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(folder, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        busy = pytest.raises(_io.FolderBusy, match=rf"pid {holder.pid}, bnbench bench \(test\)")
        with busy, _io.folder_lock(folder):
            pass
    finally:
        release.set()
        holder.join(30)
    with _io.folder_lock(folder):  # free again once the holder is gone
        assert (folder / _io.LOCK_NAME).exists()
    assert not (folder / _io.LOCK_NAME).exists()


def test_a_killed_holder_does_not_leave_the_folder_locked(tmp_path):
    folder = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(folder, ready, release))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, 9)
    holder.join(30)
    assert (folder / _io.LOCK_NAME).exists()  # the file stays behind, the lock does not
    with _io.folder_lock(folder):
        pass


def test_report_into_a_folder_being_written_is_refused(tmp_path, capsys):
    run = _bench_folder(tmp_path / "run")
    out = tmp_path / "out"
    with _io.folder_lock(out, "another report"):
        assert main(["report", str(run), "--out", str(out)]) == 2
    assert "being written by another bnbench command" in capsys.readouterr().err


# --- no command overwrites another's files ---------------------------------------------------------------------


def test_report_out_never_overwrites_a_results_folder(tmp_path, capsys):
    run = _bench_folder(tmp_path / "run")
    (run / "summary.md").write_text("the bench's own summary")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["report", str(run), "--out", str(run)]) == 2
    assert "is a results folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    assert main(["report", str(run), "--out", str(other)]) == 2
    assert "not empty and not an earlier report (thesis.tex)" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["report", str(run), "--out", str(a_file)]) == 2


def test_report_rewrites_its_own_folder_without_stale_figures(tmp_path):
    run = _bench_folder(tmp_path / "run")
    out = tmp_path / "out"
    assert main(["report", str(run), "--out", str(out)]) == 0
    (out / "old_figure.png").write_bytes(b"\x89PNG stale")
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert not (out / "old_figure.png").exists() and (out / "time_vs_batch.png").exists()
    # the page's data: a copy of the run's results.csv beside it, byte for byte
    assert (out / "run-results.csv").read_bytes() == (run / "results.csv").read_bytes()
    assert not (out / "results.csv").exists()  # a report folder never looks like a results folder
