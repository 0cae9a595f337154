"""The README's Python API example runs as written (it once hard-coded device="cuda" and used undefined names)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_example() -> str:
    if not README.exists():
        pytest.skip("README.md is not beside the tests (an installed copy of the tests)")
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "the Python API section has no python code block"
    return match.group(1)


def test_the_api_example_runs_as_written(run_python):
    # as a user runs it: a fresh process, no TRITON_INTERPRET (on CPU the layer runs its PyTorch reference)
    done = run_python("-c", _api_example(), drop=("TRITON_INTERPRET",), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "converted 1 BatchNorm + activation pair(s)" in done.stdout
    assert "after + residual (x)" in done.stdout or "refuses" in done.stdout  # the block: fused, or why not
