"""nox sessions: how bnbench is tested, linted, benchmarked and reported.

Default sessions (plain ``nox``): tests, triton36, lint. The others run the CLI: ``nox -s bench``, ``nox -s train``,
``nox -s report -- RESULTS_DIR...``; ``nox -s gpu -- OUT_DIR`` runs the GPU check on a machine with CUDA.
Extra arguments after ``--`` go to the command each session runs.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "triton36", "lint"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

# The CPU build of torch, pinned: an unpinned torch would pull a multi-GB CUDA build. triton 3.9 runs the
# interpreter with numpy 2.4.
CPU_TORCH = "torch==2.13.0"
TRITON = "triton==3.9.0"


def _install_project(session: nox.Session, extras: str = "") -> None:
    """The pinned CPU torch and triton first, then the package itself (not editable: tests use the wheel)."""
    session.install(CPU_TORCH, TRITON)
    session.install(f".[{extras}]" if extras else ".")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite on CPU: Triton kernels under the interpreter, against the installed package."""
    _install_project(session, "test,experiments")
    session.run(
        "pytest",
        *session.posargs,
        env={"TRITON_INTERPRET": "1", "BNBENCH_TEST_INSTALLED": "1", "MPLBACKEND": "Agg"},
    )


@nox.session
def triton36(session: nox.Session) -> None:
    """The kernel tests (PyTorch's module samples among them) and the sm_90 compile check under triton 3.6, the
    GPU image's version (whose interpreter needs numpy < 2.4): CI's guard that the kernels still build where they
    are timed."""
    session.install(CPU_TORCH, "triton==3.6.0", "numpy<2.4")
    session.install(".[test]")
    session.run(
        "pytest",
        "tests/test_kernels_compile.py",
        "tests/test_kernels.py",
        "tests/test_memory_saving.py",
        "tests/test_module_db.py",
        *session.posargs,
        env={"TRITON_INTERPRET": "1", "BNBENCH_TEST_INSTALLED": "1", "MPLBACKEND": "Agg"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """The main job: ``bnbench bench`` (the quick preset by default) writing CSV, PNGs and summary.md."""
    _install_project(session)
    session.run("bnbench", "bench", *session.posargs, env={"MPLBACKEND": "Agg"})


@nox.session
def train(session: nox.Session) -> None:
    """``bnbench train``: every experiment in its quick form by default (a few minutes on 2 CPU cores)."""
    _install_project(session, "experiments")
    session.run("bnbench", "train", *(session.posargs or ["--preset", "quick"]), env={"MPLBACKEND": "Agg"})


@nox.session
def report(session: nox.Session) -> None:
    """``bnbench report RESULTS_DIR... --out DIR``: tables, figures and an HTML page from result folders."""
    _install_project(session)
    session.run("bnbench", "report", *session.posargs, env={"MPLBACKEND": "Agg"})


@nox.session(python=False)
def gpu(session: nox.Session) -> None:
    """On a CUDA machine (no network needed): install in place, run the GPU tests and the standard benchmark.

    Usage: ``nox -s gpu -- OUT_DIR``. Without nox, run ``bash scripts/gpu-check.sh OUT_DIR`` (the same).
    """
    if not session.posargs:
        session.error("usage: nox -s gpu -- OUT_DIR")
    session.run("bash", "scripts/gpu-check.sh", *session.posargs, external=True)
