"""``bnbench train`` end to end on tiny settings: the files it writes, its exit codes, and its errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bnbench.cli import main
from bnbench.schema import validate_train


def test_train_writes_results_plots_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--experiment", "bn-paper", "--steps", "12", "--eval-every", "6", "--width", "8",
                 "--seeds", "2", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    frame = validate_train(pd.read_csv(out / "results.csv"))
    assert set(frame["norm"]) == {"none", "eager"} and set(frame["seed"]) == {0, 1}
    meta = json.loads((out / "results.json").read_text())
    assert meta["specs"]["bn-paper"]["optimizer"] == "sgd" and meta["specs"]["bn-paper"]["init"] == "xavier"
    assert meta["environment"]["torch_version"] and meta["run_count"] == 4
    assert (out / "bn_paper_curves.png").stat().st_size > 1000 and (out / "bn_paper_percentiles.png").exists()
    summary = (out / "summary.md").read_text()
    assert "## Verdict" in summary and "optimizer sgd (momentum 0.9)" in summary and "init xavier" in summary
    assert "## Verdict" in capsys.readouterr().out


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
        (["--activations", "swish", "--experiment", "depth", "--depths", "2", "--steps", "2"], None),
    ],
)
def test_errors(tmp_path, capsys, argv, message):
    code = main(["train", "--out", str(tmp_path / "x"), "--no-progress", *argv])
    if message is None:
        assert code == 1  # the run went on, recorded the failures, and says so
        assert "failed" in capsys.readouterr().err
    else:
        assert code == 2
        assert message in capsys.readouterr().err


def test_triton_backend_on_cpu_without_interpreter_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["train", "--experiment", "fused-vs-eager", "--fused-backend", "triton", "--no-interpret", "--out",
            str(tmp_path), "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "needs the Triton interpreter" in capsys.readouterr().err
