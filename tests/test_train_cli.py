"""``bnbench train`` end to end on tiny settings: the files it writes, its exit codes, its errors (all before
anything runs), and its output folder (one writer, nothing stale, nothing lost)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch

from bnbench import _io
from bnbench.cli import main
from bnbench.schema import validate_train

_TINY = ["--experiment", "bn-paper", "--dataset", "digits", "--lrs", "0.1", "--steps", "12", "--eval-every", "6",
         "--width", "8", "--seeds", "2", "--no-progress"]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_writes_results_plots_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *_TINY, "--out", str(out)]) == 0
    frame = validate_train(pd.read_csv(out / "results.csv"))
    assert set(frame["norm"]) == {"none", "eager"} and set(frame["seed"]) == {0, 1}
    meta = json.loads((out / "results.json").read_text())
    assert meta["kind"] == "train" and meta["specs"]["bn-paper"]["optimizer"] == "sgd"
    assert meta["environment"]["torch_version"] and meta["run_count"] == meta["runs_done"] == 4
    assert not meta["interrupted"] and meta["verdicts"]
    assert sorted(meta["files"]) == sorted(p.name for p in out.iterdir())
    assert (out / "bn_paper_curves.png").stat().st_size > 1000 and (out / "effects.png").exists()
    summary = (out / "summary.md").read_text()
    for text in ("## Verdict per claim", "optimizer sgd (momentum 0.9)", "init auto", "weight decay 0", "dropout 0",
                 "BatchNorm: PyTorch's defaults", "interleaved", "95%", "commit "):  # fmt: skip
        assert text in summary, text
    assert "## Verdict per claim" in capsys.readouterr().out


def test_fused_on_cpu_says_which_backend_ran(tmp_path):
    out = tmp_path / "fused"
    code = main(["train", "--experiment", "fused-vs-eager", "--models", "mlp", "--steps", "4", "--eval-every", "2",
                 "--seeds", "1", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    frame = pd.read_csv(out / "results.csv")
    assert set(frame.loc[frame["norm"] == "fused", "backend"]) == {"triton-interpreter"}
    assert "not timed" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "mnist"], "--data-dir"),
        (["--dataset", "mnist", "--data-dir", "."], "train-images-idx3-ubyte"),
        (["--seeds", "0"], "seeds"),
        (["--synthetic-shape", "3,x,4"], "synthetic-shape"),
        (["--momentum", "-1"], "momentum"),
        (["--depths", "0"], "depths"),
        (["--target-acc", "2"], "target accuracy"),
        (["--init", "normal", "--init-std", "-1"], "init_std"),
        (["--dropout", "1.5"], "dropout"),
        (["--activations", "swish"], "swish"),
        (["--batch-size", "100000", "--dataset", "digits"], "training images"),
    ],
)
def test_bad_settings_exit_2_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "x"
    code = main(["train", "--experiment", "bn-paper", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "step/s" not in err and "Traceback" not in err  # no progress bar was started
    assert not out.exists()  # nothing was written


def test_a_failing_fused_analysis_keeps_the_runs(tmp_path, capsys, monkeypatch):
    """Judging the runs fails (as a KeyError once did): the finished runs are on disk all the same, exit 1."""
    import bnbench.report.train as train_report

    def broken(frame):
        raise KeyError("fused")

    monkeypatch.setattr(train_report, "verdict_table", broken)
    out = tmp_path / "run"
    assert main(["train", *_TINY, "--out", str(out)]) == 1
    assert "judging them failed" in capsys.readouterr().err
    frame = validate_train(pd.read_csv(out / "results.csv"))
    assert frame["seed"].nunique() == 2
    meta = json.loads((out / "results.json").read_text())
    assert "KeyError" in meta["analysis_error"] and not (out / "summary.md").exists()


def test_out_is_never_overwritten_silently_and_leaves_nothing_stale(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *_TINY, "--out", str(out)]) == 0
    assert main(["train", *_TINY, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (out / "ics.png").write_bytes(b"a figure of another experiment")  # as an earlier run would have left it
    meta = json.loads((out / "results.json").read_text())
    meta["files"].append("ics.png")
    (out / "results.json").write_text(json.dumps(meta))
    argv = ["train", "--experiment", "lr", "--dataset", "digits", "--lrs", "0.1", "0.3", "--steps", "6",
            "--eval-every", "3", "--width", "8", "--seeds", "2", "--no-progress", "--out", str(out), "--overwrite"]  # fmt: skip
    assert main(argv) == 0
    assert not (out / "ics.png").exists() and not (out / "bn_paper_curves.png").exists()
    assert set(pd.read_csv(out / "results.csv")["experiment"]) == {"lr"}


def test_out_holding_another_commands_files_is_refused(tmp_path, capsys):
    (tmp_path / "summary.md").write_text("a bench report")
    assert main(["train", *_TINY, "--out", str(tmp_path), "--overwrite"]) == 2
    assert "not a bnbench train run" in capsys.readouterr().err
    assert (tmp_path / "summary.md").read_text() == "a bench report"
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    assert main(["train", *_TINY, "--out", str(afile)]) == 2


def test_one_writer_per_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with _io.folder_lock(out, "another writer"):  # held (flock on its own open file: refused even in-process)
        assert main(["train", *_TINY, "--out", str(out)]) == 2
    assert "another bnbench command (pid" in capsys.readouterr().err
    (out / _io.LOCK_NAME).write_text("pid 999999999\n")  # a lock file nobody holds: the folder is free
    assert main(["train", *_TINY, "--out", str(out)]) == 0
    assert not (out / _io.LOCK_NAME).exists()


def test_triton_backend_on_cpu_without_interpreter_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["train", "--experiment", "fused-vs-eager", "--fused-backend", "triton", "--no-interpret", "--out",
            str(tmp_path), "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "needs the Triton interpreter" in capsys.readouterr().err


def test_sigterm_writes_the_finished_runs_and_exits_130(tmp_path):
    """A terminated sweep (SIGTERM, as a scheduler sends) keeps what finished: results.csv whole, interrupted."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "bnbench", "train", "--experiment", "bn-paper", "--dataset", "digits", "--lrs",
            "0.1", "--width", "8", "--seeds", "20", "--steps", "400", "--eval-every", "100", "--out", str(out)]  # fmt: skip
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=os.environ | {"MPLBACKEND": "Agg"},
                                cwd=tmp_path)  # fmt: skip
        deadline = time.time() + 120
        while "lr0.1 s1" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)  # until the second seed began
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    meta = json.loads((out / "results.json").read_text())
    frame = validate_train(pd.read_csv(out / "results.csv"))
    assert meta["interrupted"] and 0 < meta["runs_done"] < meta["run_count"] == 40
    assert frame[["seed", "norm"]].drop_duplicates().shape[0] == meta["runs_done"]
    assert not (out / _io.LOCK_NAME).exists()
