"""Loading and validating result folders, the self-contained HTML page, and ``bnbench report`` end to end."""

from __future__ import annotations

import base64
import re
import sys
import types

import pandas as pd
import pytest
from matplotlib.figure import Figure

import bnbench.report
from bnbench import _io
from bnbench.cli import main
from bnbench.report.assemble import results_report
from bnbench.report.html import render_html
from bnbench.report.load import load_result
from bnbench.report.testing import synthetic_bench, synthetic_train


def _small_bench(**kwargs) -> pd.DataFrame:
    # small but with every grouping present: 2 passes, 2 batches, 2 widths, eager/compile/triton
    return synthetic_bench(
        dtypes=("fp32",), passes=("fwd", "fwd_bwd"), batches=(256, 4096), widths=(64, 1024), **kwargs
    )


def _folder(path, frame: pd.DataFrame, meta: dict | None = None):
    _io.write_csv(path / "results.csv", frame)
    if meta is not None:
        _io.write_json(path / "results.json", meta)
    return path


@pytest.fixture
def fake_train_report(monkeypatch):
    """A stand-in for bnbench.report.train (owned by the training engineer) with the agreed interface, so the
    page's training part is tested whatever state that module is in."""
    module = types.ModuleType("bnbench.report.train")

    def verdict_table(df):
        return pd.DataFrame({"claim": ["BN trains in fewer steps"], "measured": ["3.1x fewer"], "held": [True]})

    def train_figures(df):
        fig = Figure()
        fig.subplots().plot(df["step"], df["value"])
        return {"accuracy_vs_step": fig}

    module.verdict_table, module.train_figures = verdict_table, train_figures
    monkeypatch.setitem(sys.modules, "bnbench.report.train", module)
    # `from bnbench.report import train` reads the package attribute first, bound once the real module is imported
    monkeypatch.setattr(bnbench.report, "train", module, raising=False)
    return module


# --- loading ---------------------------------------------------------------------------------------------------


def test_load_detects_the_kind_and_keeps_commits_as_text(tmp_path):
    frame = _small_bench().assign(git_sha="1234567")  # all digits: must not become the integer 1234567
    bench = load_result(_folder(tmp_path / "b", frame, {"environment": {"gpu": "H200"}}))
    assert bench.kind == "bench" and bench.meta["environment"]["gpu"] == "H200"
    assert bench.frame["git_sha"].iloc[0] == "1234567"
    train = load_result(_folder(tmp_path / "t", synthetic_train()))
    assert train.kind == "train" and train.meta == {}


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda f: f.drop(columns=["ms_p80"]), r"missing column\(s\) ms_p80"),
        (lambda f: f.assign(status="fine"), "column status has unknown value"),
        (lambda f: f.assign(timer="stopwatch"), "column timer has unknown value"),
        (lambda f: f.assign(ms_p50="fast"), "column ms_p50 must be numeric"),
        (lambda f: f.assign(ms_p20=f["ms_p50"] * 2), "column ms_p20 breaks"),
        (lambda f: f.assign(is_baseline="perhaps"), "is_baseline"),
        (lambda f: f[["run_id", "N"]], "neither a bench results file .* nor a train results file"),
    ],
)
def test_schema_errors_name_the_file_and_the_column(tmp_path, corrupt, message):
    folder = _folder(tmp_path / "bad", corrupt(_small_bench()))
    with pytest.raises(ValueError, match=message) as info:
        load_result(folder)
    assert str(folder / "results.csv") in str(info.value)


def test_train_schema_errors_name_the_column(tmp_path):
    folder = _folder(tmp_path / "bad", synthetic_train().drop(columns=["seed"]))
    with pytest.raises(ValueError, match=r"results.csv: missing column\(s\) seed"):
        load_result(folder)


def test_missing_folder_and_bad_sidecar(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no results\.csv"):
        load_result(tmp_path / "nothing")
    folder = _folder(tmp_path / "b", _small_bench())
    (folder / "results.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"results\.json: not valid JSON"):
        load_result(folder)


# --- the page --------------------------------------------------------------------------------------------------


def _embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_page_embeds_every_figure_and_the_headline_table(tmp_path):
    result = load_result(_folder(tmp_path / "run", _small_bench()))
    report = results_report([result])
    page = render_html(report.title, report.sections, subtitle=report.subtitle)
    images = _embedded_images(page)
    assert len(images) == len(report.figures) == 4
    assert all(img.startswith(b"\x89PNG") for img in images)
    assert "Headline: speedups and bandwidth" in page and "geomean_vs_eager" in page
    # self-contained: no external reference; the one link is to the copy of results.csv written beside it
    assert re.findall(r"(?:src|href)=\"(?!data:|#)([^\"]*)", page) == ["run-results.csv"]
    assert "http://" not in page and "https://" not in page


def test_page_escapes_text_from_results(tmp_path):
    frame = _small_bench()
    frame.loc[0, ["status", "message"]] = ["error", "<script>alert(1)</script>"]
    report = results_report([load_result(_folder(tmp_path / "run", frame))])
    page = render_html(report.title, report.sections)
    assert "<script>" not in page and "&lt;script&gt;" in page


# --- the command ------------------------------------------------------------------------------------------------


def test_report_command_writes_summary_figures_and_page(tmp_path, capsys):
    run = _folder(tmp_path / "run", _small_bench(), {"environment": {"gpu": "NVIDIA H200"}})
    out = tmp_path / "out"
    assert main(["report", str(run), "--out", str(out), "--svg"]) == 0
    stems = ["time_vs_batch", "bandwidth", "speedup_vs_eager", "speedup_vs_compile"]
    for stem in stems:
        assert (out / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
        assert b"<svg" in (out / f"{stem}.svg").read_bytes()[:500]
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "geomean_vs_eager" in summary and "(time_vs_batch.png)" in summary
    page = (out / "index.html").read_text(encoding="utf-8")
    assert len(_embedded_images(page)) == len(stems)
    assert "NVIDIA H200" in page
    assert "open index.html" in capsys.readouterr().out


def test_report_command_bad_input_exits_2(tmp_path, capsys):
    bad = _folder(tmp_path / "bad", _small_bench().drop(columns=["gbps"]))
    assert main(["report", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "results.csv" in err and "gbps" in err
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert main(["report", "--baseline", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert main(["report", "--out", str(tmp_path / "o3")]) == 2


def test_compare_command_exit_codes(tmp_path, capsys):
    base = _small_bench()
    a = _folder(tmp_path / "a", base)
    assert main(["report", "--baseline", str(a), "--candidate", str(a), "--out", str(tmp_path / "same")]) == 0
    slower = base.copy()
    slower.loc[slower["provider"] == "triton", ["ms_p20", "ms_p50", "ms_p80"]] *= 1.5
    b = _folder(tmp_path / "b", slower)
    out = tmp_path / "cmp"
    assert main(["report", "--baseline", str(a), "--candidate", str(b), "--out", str(out)]) == 1
    comparison = pd.read_csv(out / "comparison.csv")
    assert set(comparison.loc[comparison["provider"] == "triton", "label"]) == {"slower"}
    assert "Regressions" in (out / "summary.md").read_text(encoding="utf-8")
    assert len(_embedded_images((out / "index.html").read_text(encoding="utf-8"))) == 1
    # a 50% slowdown is under a 60% threshold
    assert main(["report", "--baseline", str(a), "--candidate", str(b), "--threshold", "0.6", "--out", str(out)]) == 0
    assert "regression" in capsys.readouterr().out


def test_train_folder_goes_into_the_same_page(tmp_path, fake_train_report):
    bench = _folder(tmp_path / "bench", _small_bench())
    train = _folder(tmp_path / "train", synthetic_train())
    out = tmp_path / "out"
    assert main(["report", str(bench), str(train), "--out", str(out)]) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "Verdict per claim" in page and "BN trains in fewer steps" in page
    assert len(_embedded_images(page)) == 4 + 1  # bench figures + the training figure
    assert (out / "2-train-accuracy_vs_step.png").exists() and (out / "1-bench-time_vs_batch.png").exists()


def test_the_real_training_report_joins_the_page(tmp_path):
    # the training engineer's bnbench.report.train on a synthetic bn-paper frame: whatever figures it makes
    # must all be embedded, and its verdict table shown
    from bnbench.report import train as train_report

    frame = synthetic_train()
    result = load_result(_folder(tmp_path / "train", frame))
    report = results_report([result])
    page = render_html(report.title, report.sections)
    assert len(_embedded_images(page)) == len(train_report.train_figures(frame)) >= 1
    for claim in train_report.verdict_table(frame)["claim"]:
        assert claim in page


def test_train_folders_cannot_be_compared(tmp_path):
    train = _folder(tmp_path / "train", synthetic_train())
    bench = _folder(tmp_path / "bench", _small_bench())
    assert main(["report", "--baseline", str(bench), "--candidate", str(train), "--out", str(tmp_path / "o")]) == 2
