"""``bnbench bench`` end to end on tiny cases: files, exit codes, --resume, --dry-run, plots, cheap imports."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bnbench.bench import runner
from bnbench.bench.providers import PROVIDERS, Provider
from bnbench.cli import main
from bnbench.reference import batch_norm_act_reference
from bnbench.schema import BENCH_COLUMNS, validate_bench

# two tiny BN1d cases (8 and 16 rows of 4 channels), eager only: seconds, not minutes
TINY = ["--batch", "8,16", "--width", "4", "--pass", "fwd", "--cpu-budget-s", "0.01"]


def test_writes_csv_json_summary_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bench", *TINY, "--providers", "eager", "--out", str(out)]) == 0
    frame = validate_bench(pd.read_csv(out / "results.csv"))
    assert tuple(frame.columns) == BENCH_COLUMNS and len(frame) == 2 and (frame["status"] == "ok").all()
    sidecar = json.loads((out / "results.json").read_text())
    assert sidecar["environment"]["torch_version"] and sidecar["copy_bandwidth"]["gbps"] > 0
    assert sorted(len(v) for v in sidecar["samples_ms"].values()) == sorted(frame["n_samples"])
    assert (frame["peak_copy_gbps"] == sidecar["copy_bandwidth"]["gbps"]).all()  # the same number in every row
    summary = (out / "summary.md").read_text()
    assert summary.strip() and summary.strip() in capsys.readouterr().out  # printed at the end as well
    pngs = sorted(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)  # rendered (Agg), whole files
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind


def test_incorrect_point_exits_1_and_bad_arguments_exit_2(tmp_path, monkeypatch, capsys):
    wrong = Provider("wrong", False, lambda case: lambda *a: batch_norm_act_reference(*a) * 1.05)
    monkeypatch.setitem(PROVIDERS, "wrong", wrong)
    assert main(["bench", *TINY, "--providers", "eager,wrong", "--out", str(tmp_path / "w")]) == 1
    frame = pd.read_csv(tmp_path / "w" / "results.csv")
    assert set(frame[frame["provider"] == "wrong"]["status"]) == {"incorrect"}
    assert frame[frame["provider"] == "wrong"]["speedup_vs_eager"].isna().all()
    for bad in (["--batch", "0"], ["--providers", "nope"], ["--spatial", "3y3"], ["--pass", "forward"]):
        assert main(["bench", *bad, "--dry-run"]) == 2, bad
        assert "error" in capsys.readouterr().err
    # an existing run is never overwritten without --resume
    assert main(["bench", *TINY, "--providers", "eager", "--out", str(tmp_path / "w")]) == 2
    for bad in (["--cpu-budget-s", "nan"], ["--rep-ms", "inf"]):
        assert main(["bench", *TINY, *bad, "--out", str(tmp_path / "never")]) == 2, bad


def test_resume_refuses_a_run_from_another_device_or_commit(tmp_path):
    out = tmp_path / "r"
    assert main(["bench", *TINY, "--providers", "eager", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "results.csv")
    frame["device_name"] = "NVIDIA H200"
    frame.to_csv(out / "results.csv", index=False)
    assert main(["bench", *TINY, "--providers", "eager", "--out", str(out), "--resume"]) == 2


def test_a_crashing_provider_fails_the_run(tmp_path, monkeypatch):
    def crash(case):
        def fn(*args):
            raise RuntimeError("kernel exploded")

        return fn

    monkeypatch.setitem(PROVIDERS, "crash", Provider("crash", False, crash))
    assert main(["bench", *TINY, "--providers", "eager,crash", "--out", str(tmp_path / "c")]) == 1
    frame = pd.read_csv(tmp_path / "c" / "results.csv")
    assert set(frame[frame["provider"] == "crash"]["status"]) == {"error"}  # recorded, and the sweep went on
    assert set(frame[frame["provider"] == "eager"]["status"]) == {"ok"}


def test_resume_skips_finished_points_and_retries_errors(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(["bench", *TINY, "--providers", "eager", "--out", str(out)]) == 0
    first = pd.read_csv(out / "results.csv")
    first.loc[first["shape"] == "16x4", "status"] = "error"  # as if that point had failed
    first.to_csv(out / "results.csv", index=False)

    measured = []
    real = runner.measure_point

    def spy(case, provider, ctx):
        measured.append(case.shape_str)
        return real(case, provider, ctx)

    monkeypatch.setattr(runner, "measure_point", spy)
    assert main(["bench", *TINY, "--providers", "eager", "--out", str(out), "--resume"]) == 0
    assert measured == ["16x4"]  # 8x4 was finished; the error point is measured again
    again = pd.read_csv(out / "results.csv")
    assert sorted(again["shape"]) == ["16x4", "8x4"] and (again["status"] == "ok").all()  # one row per point
    assert again["run_id"].nunique() == 1
    measured.clear()
    assert main(["bench", *TINY, "--providers", "eager", "--out", str(out), "--resume"]) == 0
    assert measured == []


def test_dry_run_lists_points_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(["bench", "--preset", "quick", "--providers", "eager,compile", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "24 point(s)" in text and "fwd_bwd fp32 relu 16x64x14x14 channels_last" in text
    assert not out.exists()


def test_help_and_dry_run_import_neither_triton_nor_dynamo(run_python):
    code = (
        "import sys\n"
        "from bnbench.cli import main\n"
        "try:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
        "main(['bench', '--dry-run', '--providers', 'eager,compile,triton'])\n"
        "bad = [m for m in ('triton', 'torch._dynamo', 'torch._inductor') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env_run = run_python("-c", code, timeout=120)
    assert env_run.returncode == 0, env_run.stderr[-2000:]
    assert "--preset" in env_run.stdout and "quick" in env_run.stdout


@pytest.fixture(autouse=True)
def _small_copy_probe(monkeypatch):
    """The copy-bandwidth probe at 4 MiB: on CPU it defaults to the last-level cache's size (hundreds of MiB
    on a server), seconds per run that these tests do not need."""
    from bnbench.bench import bandwidth

    monkeypatch.setattr(bandwidth, "default_copy_bytes", lambda device: 4 << 20)
