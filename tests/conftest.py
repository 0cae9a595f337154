"""Test set-up: the Triton interpreter on machines without CUDA, strict markers, seeding.

TRITON_INTERPRET must be set before triton is imported (Triton decides at kernel-decoration time); importing
torch does not import triton, so checking for CUDA first is safe.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (this machine has none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def run_python(tmp_path):
    """Run ``python ARGS`` in a fresh process, from an empty folder so that the source tree is not importable
    (the installed package is what runs). ``env`` adds variables, ``drop`` removes them."""

    def run(*args: str, env: dict[str, str] | None = None, drop: tuple[str, ...] = (), timeout: float = 600):
        environ = {k: v for k, v in os.environ.items() if k not in drop}
        environ.update(env or {})
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=environ, cwd=tmp_path
        )

    return run


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch, numpy and random before every test (tests are reproducible); returns the seed."""
    value = 1234
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


@pytest.fixture
def launches(monkeypatch) -> dict[str, int]:
    """Counts calls of the Triton launchers the custom ops use, keyed by name without ``bn_act_``
    (``fwd_train``, ``fwd_eval``, ``bwd``, ``bwd_from_output``): proof that the kernels, not the PyTorch
    reference, ran."""
    from bnbench import kernels

    counts = dict.fromkeys(("fwd_train", "fwd_eval", "bwd", "bwd_from_output"), 0)
    for name in counts:
        original = getattr(kernels, f"bn_act_{name}")

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, f"bn_act_{name}", counted)
    return counts


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU under the Triton interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
