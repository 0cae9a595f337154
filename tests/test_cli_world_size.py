"""``--world-size K`` on ``bnbench bench`` and ``bnbench train`` hands the run to the torchrun entry point of the
synchronized layer with the right arguments (the distributed runs themselves are tested in test_distributed)."""

from __future__ import annotations

import pytest

from bnbench import cli, distributed_cli


@pytest.fixture
def captured(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed_cli, "main", lambda argv: calls.append(argv) or 0)
    return calls


def test_bench_world_size_passes_the_case_axes(captured, tmp_path):
    argv = ["bench", "--world-size", "2", "--batch", "64,128", "--width", "32", "--spatial", "1,7x7"]
    assert cli.main([*argv, "--dtype", "bf16", "--layout", "nchw,channels_last", "--out", str(tmp_path)]) == 0
    (passed,) = captured
    assert passed[:5] == ["bench", "--world-size", "2", "--out", str(tmp_path)]
    assert passed[passed.index("--batch") + 1] == "64,128" and passed[passed.index("--spatial") + 1] == "1,7x7"
    assert passed[passed.index("--dtype") + 1] == "bf16" and "--channels-last" in passed


def test_train_world_size_takes_one_model(captured, tmp_path):
    argv = ["train", "--world-size", "3", "--out", str(tmp_path), "--models", "cnn", "--depths", "2"]
    assert cli.main([*argv, "--batch-size", "16", "--steps", "5"]) == 0
    (passed,) = captured
    assert passed[:5] == ["train", "--world-size", "3", "--out", str(tmp_path)]
    pairs = dict(zip(passed[5::2], passed[6::2], strict=True))
    assert pairs == {"--model": "cnn", "--depth": "2", "--batch": "16", "--steps": "5"}
    assert cli.main(["train", "--world-size", "2", "--out", str(tmp_path), "--lrs", "0.1", "0.2"]) == 2
    assert cli.main(["bench", "--world-size", "2"]) == 2  # no --out: rank 0 would not know where to write
