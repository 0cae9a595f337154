"""``bnbench bench``'s command line as a user meets it: help that does not repeat itself, a progress bar that
can be switched off, error messages that name their actual cause."""

from __future__ import annotations

import re

import pytest

from bnbench.cli import main


@pytest.fixture(autouse=True)
def _small_copy_probe(monkeypatch):
    """The copy-bandwidth probe at 4 MiB (on CPU it defaults to the last-level cache's size)."""
    from bnbench.bench import bandwidth

    monkeypatch.setattr(bandwidth, "default_copy_bytes", lambda device: 4 << 20)


@pytest.mark.parametrize("command", ["bench", "report", "train", "step", "profile"])
def test_help_never_says_default_none_or_doubles_a_default(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"default[^()]*\)\s*\(default:", text), command  # the help named its default already


def test_no_progress_keeps_stderr_free_of_bars(tmp_path, capsys):
    argv = ["--batch", "8", "--width", "4", "--pass", "fwd", "--cpu-budget-s", "0.01", "--providers", "eager"]
    assert main(["bench", *argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "pt/s" not in err and "%|" not in err
    assert main(["bench", *argv, "--out", str(tmp_path / "run2")]) == 0
    assert "%|" in capsys.readouterr().err  # the bar is there by default


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["--layout", "channels_last", "--spatial", "1"], True),
        (["--layout", "channels_last"], True),
        (["--preset", "quick", "--batch", "3"], False),
        (["--preset", "quick", "--dtype", "bf16"], False),
    ],
)
def test_no_case_left_names_channels_last_only_when_that_is_the_cause(capsys, argv, hint):
    assert main(["bench", *argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark case left" in err
    assert ("channels_last needs a spatial size" in err) is hint
