"""nox sessions: how bnbench is tested, linted, benchmarked and reported.

Default sessions (plain ``nox``): tests, triton36, lint. The others run the CLI: ``nox -s bench``, ``nox -s train``,
``nox -s report -- RESULTS_DIR...``; ``nox -s gpu -- OUT_DIR`` runs the GPU check on a machine with CUDA.
Extra arguments after ``--`` go to the command each session runs.

Set-up cost: torch (0.75 GB installed) and triton (1 GB) are most of every session's virtual environment, and
installing them took most of a session's first minutes. They are installed once into ``.nox/_shared/`` (one
folder per pinned requirement, ``pip install --target``) and every session that needs them links that folder
into its own fresh venv (a ``.pth`` file); everything else (bnbench itself, pytest, pandas...) is installed in
the session's venv as before, so the tests still run against an installed wheel. A shared folder is rebuilt
when its pin changes; ``rm -rf .nox`` starts from nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests", "triton36", "lint"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

# The CPU build of torch, pinned: an unpinned torch would pull a multi-GB CUDA build. triton 3.9 runs the
# interpreter with numpy 2.4.
CPU_TORCH = "torch==2.13.0"
TRITON = "triton==3.9.0"


SHARED = Path(".nox") / "_shared"
#: written into a shared folder once its install finished: the requirements it holds
_STAMP = ".bnbench-requirements"


def _venv_paths(session: nox.Session) -> tuple[str, str] | None:
    """(the venv's purelib folder, its Python's "py311"-style tag); None when installs are skipped."""
    out = session.run_install(
        "python", "-c", "import sys, sysconfig; print(sysconfig.get_paths()['purelib']); "
        "print(f'py{sys.version_info.major}{sys.version_info.minor}')", silent=True,
    )  # fmt: skip
    if out is None:  # --no-install on a reused venv: nothing runs, the links made before stay
        return None
    purelib, tag = out.strip().splitlines()[-2:]
    return purelib, tag


def _shared(session: nox.Session, tag: str, requirement: str) -> Path:
    """``requirement`` installed once into ``.nox/_shared/<tag>-<name>/``; reused while its pin is unchanged,
    installed again whole otherwise (a half-finished install has no stamp)."""
    name = requirement.replace("==", "-").replace("<", "lt")
    target = (SHARED / f"{tag}-{name}").resolve()
    stamp = target / _STAMP
    if not (stamp.is_file() and stamp.read_text() == requirement + "\n"):
        shutil.rmtree(target, ignore_errors=True)
        session.run_install("python", "-m", "pip", "install", "--quiet", "--target", str(target), requirement)
        stamp.write_text(requirement + "\n")
    return target


def _link_shared(session: nox.Session, *requirements: str) -> None:
    """Make each requirement's shared folder importable in this session's venv (one .pth file), so pip sees
    it as installed and does not install it again."""
    paths = _venv_paths(session)
    if paths is None:
        return
    purelib, tag = paths
    folders = [_shared(session, tag, r) for r in requirements]
    Path(purelib, "bnbench-shared.pth").write_text("".join(f"{f}\n" for f in folders))


def _install_project(session: nox.Session, extras: str = "") -> None:
    """The pinned CPU torch and triton (shared), then the package itself (not editable: tests use the wheel)."""
    _link_shared(session, CPU_TORCH, TRITON)
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
    """The kernel tests (PyTorch's module samples among them) and the sm_90 compile and property checks under
    triton 3.6, the GPU image's version (whose interpreter needs numpy < 2.4): CI's guard that the kernels still
    build, within their register ceilings, where they are timed."""
    _link_shared(session, CPU_TORCH)
    session.install("triton==3.6.0", "numpy<2.4")
    session.install(".[test]")
    session.run(
        "pytest",
        "tests/test_kernels_compile.py",
        "tests/test_kernels_properties.py",  # registers, spills, LDGSTS and barriers as the GPU image compiles them
        "tests/test_kernels.py",
        "tests/test_memory_saving.py",
        "tests/test_inspect.py",  # the recording driver against Triton 3.6's driver interface
        "tests/test_launch.py",  # the direct launch against Triton 3.6's launcher convention
        "tests/test_module_db.py",
        # the residual kernels' numerics run under 3.9's interpreter (tests session); here their sm_90 builds are
        # checked by test_kernels_compile and test_kernels_properties
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
