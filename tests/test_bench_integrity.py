"""``bnbench bench`` keeps what it finished and says how complete it is: one writer per folder, completeness in
results.json, --resume only with the same options, bad input refused before anything is measured."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bnbench import _io
from bnbench.bench import runner
from bnbench.cli import main
from bnbench.envinfo import cpu_name

# two tiny BN1d cases, eager only: seconds
OPTIONS = {"--batch": "8,16", "--width": "4", "--pass": "fwd", "--cpu-budget-s": "0.01", "--providers": "eager"}


def _argv(changes: dict[str, str] | None = None) -> list[str]:
    return [word for option in {**OPTIONS, **(changes or {})}.items() for word in option]


TINY = _argv()


@pytest.fixture(autouse=True)
def _small_copy_probe(monkeypatch):
    """The copy-bandwidth probe at 4 MiB (on CPU it defaults to the last-level cache's size)."""
    from bnbench.bench import bandwidth

    monkeypatch.setattr(bandwidth, "default_copy_bytes", lambda device: 4 << 20)


def _spy(monkeypatch, fail_at: int | None = None) -> list[str]:
    """Record the points measured; raise KeyboardInterrupt when measuring point number ``fail_at`` (1-based)."""
    measured: list[str] = []
    real = runner.measure_point

    def spy(case, provider, ctx):
        if fail_at is not None and len(measured) + 1 == fail_at:
            raise KeyboardInterrupt
        measured.append(case.shape_str)
        return real(case, provider, ctx)

    monkeypatch.setattr(runner, "measure_point", spy)
    return measured


def _sidecar(out) -> dict:
    return json.loads((out / "results.json").read_text())


def test_a_second_writer_on_the_same_folder_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    measured = _spy(monkeypatch)
    with _io.folder_lock(out, "bnbench bench (the first run)"):
        assert main(["bench", *TINY, "--out", str(out)]) == 2
    assert "being written by another bnbench command" in capsys.readouterr().err
    assert measured == [] and not (out / "results.csv").exists()


def test_a_finished_run_records_its_completeness_and_machine(tmp_path):
    out = tmp_path / "run"
    assert main(["bench", *TINY, "--out", str(out)]) == 0
    run = _sidecar(out)["run"]
    assert run["state"] == "complete" and run["points_planned"] == 2 and run["points_done"] == 2
    assert "finished_utc" in run
    machine = _sidecar(out)["machine"]
    assert set(machine) == {"before", "after"} and machine["after"]["copy"]["gbps"] > 0
    frame = pd.read_csv(out / "results.csv")
    assert set(frame["device_name"]) == {cpu_name()}
    assert "Complete: all 2 planned point(s) are recorded." in (out / "summary.md").read_text()
    assert not (out / _io.LOCK_NAME).exists()


def test_an_interrupted_run_says_so_and_keeps_what_it_finished(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _spy(monkeypatch, fail_at=2)
    assert main(["bench", *TINY, "--out", str(out)]) == 130
    run = _sidecar(out)["run"]
    assert run["state"] == "interrupted" and run["points_planned"] == 2 and run["points_done"] == 1
    assert "finished_utc" not in run
    assert len(pd.read_csv(out / "results.csv")) == 1
    assert (
        "INCOMPLETE: 1 of 2 planned point(s) are recorded; the run was interrupted" in (out / "summary.md").read_text()
    )
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "page")]) == 0
    assert "INCOMPLETE: 1 of 2" in (tmp_path / "page" / "summary.md").read_text()
    # --resume measures the missing point and the run becomes complete
    monkeypatch.undo()
    measured = _spy(monkeypatch)
    assert main(["bench", *TINY, "--out", str(out), "--resume"]) == 0
    assert measured == ["16x4"] and _sidecar(out)["run"]["state"] == "complete"
    earlier = _sidecar(out)["previous_runs"][-1]
    assert earlier["state"] == "interrupted" and earlier["machine"]["before"]["copy"]["gbps"] > 0


@pytest.mark.parametrize(
    "changed",
    [{"--seed": "1"}, {"--providers": "eager,compile"}, {"--batch": "8,32"}, {"--cpu-budget-s": "0.05"}],
)
def test_resume_refuses_other_options_naming_the_difference(tmp_path, monkeypatch, capsys, changed):
    out = tmp_path / "run"
    assert main(["bench", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    measured = _spy(monkeypatch)
    assert main(["bench", *_argv(changed), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    (named,) = changed
    assert f"cannot resume {out}" in err and named in err and "Traceback" not in err
    assert measured == []


@pytest.mark.parametrize("sidecar", ["{not json", "[1, 2]"])
def test_resume_with_a_bad_results_json_is_a_clear_error(tmp_path, capsys, sidecar):
    out = tmp_path / "run"
    assert main(["bench", *TINY, "--out", str(out)]) == 0
    (out / "results.json").write_text(sidecar)
    capsys.readouterr()
    assert main(["bench", *TINY, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and "Traceback" not in err


def test_out_naming_a_file_is_refused_before_anything_is_measured(tmp_path, monkeypatch, capsys):
    target = tmp_path / "a-file"
    target.write_text("mine")
    measured = _spy(monkeypatch)
    assert main(["bench", *TINY, "--out", str(target)]) == 2
    assert measured == [] and target.read_text() == "mine"
    assert "is a file" in capsys.readouterr().err


def test_cpu_timings_that_fit_in_the_cache_are_marked(tmp_path):
    from bnbench.bench.runner import CACHE_RESIDENT
    from bnbench.envinfo import cpu_cache_bytes
    from bnbench.report import scope

    if not cpu_cache_bytes():
        pytest.skip("the CPU's cache size cannot be read here")
    assert scope.CACHE_RESIDENT == CACHE_RESIDENT  # the report's copy of the harness's word
    out = tmp_path / "run"
    assert main(["bench", *TINY, "--out", str(out)]) == 0
    frame = pd.read_csv(out / "results.csv")
    assert frame["message"].str.startswith(f"{CACHE_RESIDENT}: ").all()  # a few KiB per call, on every point
    summary = (out / "summary.md").read_text()
    assert "2 timed point(s) move few enough bytes to stay in the CPU's last-level cache" in summary
    assert "Kernel timings need a GPU" in summary
