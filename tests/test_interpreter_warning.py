"""A large input given to the Triton interpreter is warned about before the minutes-long simulation starts."""

from __future__ import annotations

import warnings

import pytest
import torch

import bnbench
from bnbench import interpreter


@pytest.fixture
def interpreted():
    if not interpreter.interpreter_active():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, no CUDA device)")


def test_a_large_input_is_warned_about(interpreted, monkeypatch):
    monkeypatch.setattr(interpreter, "LARGE_NUMEL", 32)  # a tiny "large" tensor: the warning, not the minutes
    layer = bnbench.BatchNormAct2d(4, backend="triton")
    with pytest.warns(RuntimeWarning, match=r"simulate a 64-element input in numpy"):
        layer(torch.randn(2, 4, 2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 4, 2, 2))  # 32 elements: at the limit, no warning


def test_the_default_limit_is_below_the_readme_sized_input():
    # 32x64x28x28 took 40 s forward and 102 s backward in the interpreter on a 2-core CPU
    assert interpreter.LARGE_NUMEL < 32 * 64 * 28 * 28
