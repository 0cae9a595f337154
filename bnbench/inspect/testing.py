"""Helpers for tests of deterministic speed properties (launch counts, registers, spills, load widths, cp.async,
barriers in loops) over many cases, written in a few lines::

    doc = inspect_json("--preset", "baseline", "--pass", "fwd")
    assert all(row["spill_bytes"] == 0 for row in doc["launches"])

``inspect_json`` runs ``python -m bnbench inspect --json`` in a fresh process with TRITON_INTERPRET removed (the
test process itself runs the interpreter on CPU). Inside such a process, :func:`compiled_facts` gives the rows
directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from bnbench.bench.cases import Case

__all__ = ["compiled_facts", "inspect_json", "run_inspect"]


def run_inspect(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m bnbench inspect ARGS`` in a fresh process without TRITON_INTERPRET, from an empty folder (so
    that the installed package runs, never a source tree in the working directory)."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update({"TRITON_DEFAULT_FP_FUSION": "1", **(env or {})})
    with tempfile.TemporaryDirectory(prefix="bnbench-inspect-") as cwd:
        return subprocess.run([sys.executable, "-m", "bnbench", "inspect", *args], capture_output=True, text=True,
                              timeout=timeout, env=environ, cwd=cwd)  # fmt: skip


def inspect_json(*args: str, timeout: float = 900) -> dict:
    """The ``--json`` document of ``bnbench inspect ARGS`` (AssertionError with stderr if it failed)."""
    done = run_inspect(*args, "--json", timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def compiled_facts(case: Case, target: str = "sm_90") -> list[dict]:
    """One row per launch of ``case``'s pass (``bnbench inspect``'s launch rows), in a process where the kernels
    are real JIT functions (TRITON_INTERPRET unset)."""
    from bnbench.inspect.plan import launch_rows
    from bnbench.inspect.record import record_pass
    from bnbench.kernels._target import parse_target

    resolved = parse_target(target)
    return launch_rows(record_pass(case, resolved), resolved)
